//! Impostor switches against real Open vSwitch (issue 15, items 1 and 2).
//!
//! Over TLS: the tree's bridges connect with the test bed's switch certificate and a
//! replication gets installed; then a peer with a valid certificate for another datapath
//! id claims a real switch's id (refused: its certificate does not grant it), a peer with
//! a valid certificate for the real id claims it while the real switch is alive (refused
//! by the duplicate policy), and peers without a certificate or without TLS are refused in
//! the handshake. The real switches stay connected and the replication installed.
//!
//! Over plain TCP on loopback: an impostor claiming a live bridge's id does not displace
//! it.
//!
//! Needs root, Open vSwitch and iproute2; skipped without them, except under CI=true.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::wait_installed;
use ncp_controller::openflow::{Decoder, Message, SwitchFeatures, encode};
use ncp_controller::pki;
use ncp_controller::service::Metrics;
use ncp_controller::switch::{Controller, ServerConfig};
use ncp_controller::topology::Dpid;
use ncp_testbed::Testbed;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// The two scenes bring up test beds in one OVS; they take turns (an await-safe lock).
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TLS_PREFIX: &str = "nc4t";
const PLAIN_PREFIX: &str = "nc4u";

/// How long the controller may take to refuse; far below the 15 s after which it would
/// drop a silent peer anyway.
const REFUSAL_LIMIT: Duration = Duration::from_secs(5);

/// Plays a switch claiming `dpid`: HELLO, FEATURES_REPLY, then echo answers. Returns
/// `true` when the controller closes the connection within [`REFUSAL_LIMIT`], `false`
/// when it is still talking to us then.
async fn claim<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, dpid: Dpid) -> bool {
    let talk = async {
        s.write_all(&encode(&Message::Hello { versions: vec![4] }, 1))
            .await
            .ok()?;
        let mut dec = Decoder::default();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.ok()?;
            if n == 0 {
                return Some(());
            }
            dec.feed(&buf[..n]);
            while let Ok(Some(f)) = dec.next_frame() {
                let reply = match f.message {
                    Message::FeaturesRequest => Message::FeaturesReply(SwitchFeatures {
                        datapath_id: dpid,
                        n_buffers: 0,
                        n_tables: 254,
                        auxiliary_id: 0,
                        capabilities: 0,
                    }),
                    Message::EchoRequest(d) => Message::EchoReply(d),
                    _ => continue,
                };
                s.write_all(&encode(&reply, f.xid)).await.ok()?;
            }
        }
    };
    // A read or write error is the controller closing on us too.
    timeout(REFUSAL_LIMIT, talk).await.is_ok()
}

/// A TLS client trusting the test bed's CA, presenting `identity` (certificate, key) if
/// given.
async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    #[allow(deprecated)] // the same provider as the controller; see switch::tls
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(c.expect("CA pem")).expect("CA cert");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_root_certificates(roots);
    let cfg = match identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .expect("cert file")
                .collect::<Result<Vec<_>, _>>()
                .expect("cert pem");
            let key = PrivateKeyDer::from_pem_file(key).expect("key pem");
            builder.with_client_auth_cert(chain, key).expect("identity")
        }
        None => builder.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("ncpd").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
}

/// Without a certificate the TLS 1.3 handshake may look finished from the client's side
/// (the server checks the client's certificate last); either way the controller must
/// close before any OpenFlow is exchanged.
async fn refused_without_certificate(addr: std::net::SocketAddr, ca: &Path) -> bool {
    match tls_connect(addr, ca, None).await {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s
                .write_all(&encode(&Message::Hello { versions: vec![4] }, 1))
                .await;
            let mut buf = [0u8; 64];
            matches!(
                timeout(REFUSAL_LIMIT, s.read(&mut buf)).await,
                Ok(Ok(0) | Err(_))
            )
        }
    }
}

/// Every switch of the tree is connected and answers a barrier.
async fn all_switches_answer(ctl: &Controller, dpids: &[Dpid]) {
    let mut connected = ctl.connected();
    connected.sort_unstable();
    let mut want = dpids.to_vec();
    want.sort_unstable();
    assert_eq!(connected, want, "every real switch still connected");
    for &d in dpids {
        ctl.barrier(d).await.expect("the real switch answers");
    }
}

fn metrics_line(m: &Metrics) -> String {
    format!(
        "tls_refused={} unauthorized={} duplicate={}",
        m.tls_refused, m.unauthorized_dpid_refused, m.duplicate_dpid_refused
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_switches_work_and_impostors_are_refused() {
    let _turn = TURN.lock().await;
    let tools = ["ovs-ofctl", "ovs-vsctl"];
    let Some((scene, _)) =
        common::tree_scene_replicating("controller impostor tls", &tools, TLS_PREFIX).await
    else {
        return;
    };
    let (svc, api, bed) = (&scene.svc, &scene.api, &scene.bed);
    let ctl = svc.controller();
    let dpids = common::tree_dpids(TLS_PREFIX);
    let br = bed.bridge("leaf1").expect("bridge");
    assert_eq!(
        common::sh(&["ovs-vsctl", "get-controller", &br]).trim(),
        format!("ssl:127.0.0.1:{}", ctl.local_addr().port())
    );

    // The real switches connect over TLS and the replication is installed on them.
    common::wait_links(api, Duration::from_secs(30)).await;
    wait_installed(api, 1, true, Duration::from_secs(30)).await;
    assert!(
        !common::ncp_rules(svc, bed.dpid("agg1").expect("dpid"))
            .await
            .is_empty()
    );
    assert_eq!(
        svc.metrics().tls_refused,
        0,
        "the real switches were let in"
    );

    let dir = Testbed::pki_dir(TLS_PREFIX);
    let ca = dir.join(pki::CA_CERT);
    let leaf1 = bed.dpid("leaf1").expect("dpid");
    let addr = ctl.local_addr();

    // 1. A valid certificate from the same CA, for another datapath id.
    let other = pki::switch(&dir, "impostor", &[0x99]).expect("impostor certificate");
    let s = tls_connect(addr, &ca, Some((&other.cert, &other.key)))
        .await
        .expect("a CA-signed certificate passes the TLS handshake");
    assert!(claim(s, leaf1).await, "claim of an ungranted id refused");
    assert_eq!(svc.metrics().unauthorized_dpid_refused, 1);

    // 2. A certificate that does grant leaf1's id (say, copied from the switch): the
    // duplicate policy keeps the live switch.
    let copy = pki::switch(&dir, "copy", &[leaf1]).expect("second certificate");
    let s = tls_connect(addr, &ca, Some((&copy.cert, &copy.key)))
        .await
        .expect("handshake");
    assert!(claim(s, leaf1).await, "claim of a live switch's id refused");
    assert_eq!(svc.metrics().duplicate_dpid_refused, 1);

    // 3. No certificate, and no TLS at all.
    assert!(refused_without_certificate(addr, &ca).await);
    let plain = TcpStream::connect(addr).await.expect("connect");
    assert!(claim(plain, leaf1).await, "plain OpenFlow refused");
    let m = svc.metrics();
    assert_eq!(m.tls_refused, 2, "{}", metrics_line(&m));
    assert_eq!(m.unauthorized_dpid_refused, 1, "{}", metrics_line(&m));

    // The real switches never noticed: all connected, answering, rules in place.
    all_switches_answer(ctl, &dpids).await;
    let r = wait_installed(api, 1, true, Duration::from_secs(5)).await;
    assert_eq!(r["installed"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_impostor_does_not_displace_a_live_bridge() {
    if !ncp_testbed::ready_or_skip("controller impostor plain", &["ovs-ofctl", "ovs-vsctl"]) {
        return;
    }
    let _turn = TURN.lock().await;
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let cfg = ServerConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        ..ServerConfig::default()
    };
    let (ctl, mut events) = Controller::start(cfg).await.expect("listen");
    let _down = common::Down(PLAIN_PREFIX);
    let bed = common::tree_up(PLAIN_PREFIX, ctl.local_addr().port());
    let dpids = common::tree_dpids(PLAIN_PREFIX);
    common::wait_for(Duration::from_secs(30), "all bridges connected", || {
        let all = ctl.connected().len() == dpids.len();
        async move { all.then_some(()) }
    })
    .await;
    while events.try_recv().is_ok() {}

    let leaf1 = bed.dpid("leaf1").expect("dpid");
    for n in 1..=2 {
        let s = TcpStream::connect(ctl.local_addr()).await.expect("connect");
        assert!(claim(s, leaf1).await, "impostor {n} refused");
        assert_eq!(ctl.duplicate_claims_refused(), n);
    }
    all_switches_answer(&ctl, &dpids).await;
    // Neither a disconnect of the real bridge nor a connect of the impostor was reported.
    while let Ok(e) = events.try_recv() {
        assert!(
            matches!(e, ncp_controller::switch::SwitchEvent::Message { .. }),
            "unexpected {e:?}"
        );
    }
}
