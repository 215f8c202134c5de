//! OpenFlow over TLS with mutual authentication, and which datapath ids a switch's
//! certificate lets it claim.
//!
//! ncpd presents its certificate and requires one from every switch, signed by the CA
//! given with `--tls-ca`; a peer without one never gets past the TLS handshake. A switch
//! may then claim (in FEATURES_REPLY) only the datapath ids its certificate grants:
//!
//! - ids named in the certificate itself, as subject-alternative-name URIs
//!   `dpid:<16 hex digits>`, the form `ncpctl pki switch --dpid X` issues; and
//! - ids an allow-list file (`--tls-switch-map`) grants to the certificate's subject
//!   common name, for certificates made by OVS's own `ovs-pki req+sign NAME switch`,
//!   which cannot carry such URIs. Lines are `<common name> = <dpid>[, <dpid>...]`
//!   (`#` starts a comment; ids in hex with `0x` or as 16 hex digits). Give `ovs-pki`
//!   `--unique` (`-u`) so the common name is exactly NAME and not NAME plus a UUID.
//!
//! One ovs-vswitchd uses one certificate for all its bridges, so one certificate may
//! grant several ids. A claim of any other id is refused, logged and counted.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

use crate::topology::Dpid;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("TLS set-up: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{path}:{line}: {message}")]
    Map {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("the switch's certificate cannot be parsed: {0}")]
    Certificate(String),
}

/// Parses a datapath id: `0x`-prefixed hex, 16 hex digits (as OVS prints them), or
/// decimal.
pub fn parse_dpid(s: &str) -> Result<Dpid, String> {
    let s = s.trim();
    let parsed = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None if s.len() == 16 => u64::from_str_radix(s, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("bad datapath id {s:?}: {e}"))
}

/// Common name → datapath ids it may claim (the `--tls-switch-map` file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwitchMap(HashMap<String, BTreeSet<Dpid>>);

impl SwitchMap {
    /// Parses the file's text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, TlsError> {
        let mut map: HashMap<String, BTreeSet<Dpid>> = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let err = |message: String| TlsError::Map {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let (name, ids) = line
                .rsplit_once('=')
                .ok_or_else(|| err("expected `<common name> = <dpid>, ...`".into()))?;
            let name = name.trim();
            if name.is_empty() {
                return Err(err("empty common name".into()));
            }
            let entry = map.entry(name.to_string()).or_default();
            for id in ids.split(',').filter(|s| !s.trim().is_empty()) {
                entry.insert(parse_dpid(id).map_err(err)?);
            }
        }
        Ok(SwitchMap(map))
    }

    pub fn load(path: &Path) -> Result<Self, TlsError> {
        let text = std::fs::read_to_string(path).map_err(|e| TlsError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::parse(&text, path)
    }
}

/// Who a verified switch certificate names and what it may claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The subject common name (empty when the certificate has none).
    pub name: String,
    pub dpids: BTreeSet<Dpid>,
}

impl Credentials {
    /// Reads the end-entity certificate (DER) of a peer that passed verification.
    pub fn of(cert_der: &[u8], map: &SwitchMap) -> Result<Self, TlsError> {
        let (_, cert) = X509Certificate::from_der(cert_der)
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        let name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or("")
            .to_string();
        let mut dpids = map.0.get(&name).cloned().unwrap_or_default();
        let san = cert
            .subject_alternative_name()
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        for general in san.iter().flat_map(|s| s.value.general_names.iter()) {
            if let GeneralName::URI(uri) = general
                && let Some(hex) = uri.strip_prefix("dpid:")
            {
                // A malformed entry grants nothing rather than failing the switch's
                // other, valid entries.
                match u64::from_str_radix(hex, 16) {
                    Ok(d) if hex.len() == 16 => {
                        dpids.insert(d);
                    }
                    _ => tracing::warn!(%name, uri, "ignoring a malformed dpid URI"),
                }
            }
        }
        Ok(Credentials { name, dpids })
    }

    pub fn may_claim(&self, dpid: Dpid) -> bool {
        self.dpids.contains(&dpid)
    }
}

/// Where ncpd's TLS material is (`--tls-cert`, `--tls-key`, `--tls-ca`,
/// `--tls-switch-map`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub switch_map: Option<PathBuf>,
}

/// The loaded TLS side of the OpenFlow listener.
#[derive(Clone)]
pub struct SwitchTls {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) map: Arc<SwitchMap>,
}

impl fmt::Debug for SwitchTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwitchTls")
            .field("map", &self.map)
            .finish_non_exhaustive()
    }
}

fn file_err(path: &Path) -> impl Fn(rustls_pki_types::pem::Error) -> TlsError + '_ {
    move |e| TlsError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(file_err(path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(file_err(path))?;
    if certs.is_empty() {
        return Err(TlsError::File {
            path: path.to_path_buf(),
            message: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

impl SwitchTls {
    /// Loads the certificate, key, CA and allow-list; fails on anything unusable.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        // ring rather than aws-lc-rs: no C/cmake build of aws-lc. rustls deprecates ring's
        // provider for lacking post-quantum key exchange, which the peers do not offer
        // anyway (OVS 3.1 links OpenSSL 3.0, which has none).
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs(&files.ca)? {
            roots.add(ca)?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .build()?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(file_err(&files.key))?;
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&files.cert)?, key)?;
        let map = match &files.switch_map {
            Some(p) => SwitchMap::load(p)?,
            None => SwitchMap::default(),
        };
        Ok(SwitchTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            map: Arc::new(map),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki;

    fn der(path: &Path) -> Vec<u8> {
        certs(path).expect("pem")[0].to_vec()
    }

    #[test]
    fn certificate_names_its_dpids() {
        let dir = pki::test_dir("creds");
        pki::init(&dir).expect("init");
        let sw = pki::switch(&dir, "leaf1", &[0x51, 0xa1]).expect("switch");
        let c = Credentials::of(&der(&sw.cert), &SwitchMap::default()).expect("parse");
        assert_eq!(c.name, "leaf1");
        assert!(c.may_claim(0x51) && c.may_claim(0xa1));
        assert!(!c.may_claim(0x52));
        // The controller's own certificate names no dpid, so it can claim none.
        let ctl = Credentials::of(&der(&dir.join(pki::CONTROLLER_CERT)), &SwitchMap::default())
            .expect("parse");
        assert!(ctl.dpids.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn allow_list_grants_by_common_name() {
        let dir = pki::test_dir("map");
        pki::init(&dir).expect("init");
        let sw = pki::switch(&dir, "ovs-host-1", &[0x1]).expect("switch");
        let map = SwitchMap::parse(
            "# ovs-pki certificates\n\
             ovs-host-1 = 0x51, 00000000000000a1\n\
             other = 7 # decimal\n",
            Path::new("map"),
        )
        .expect("map");
        let c = Credentials::of(&der(&sw.cert), &map).expect("parse");
        assert_eq!(c.dpids, BTreeSet::from([0x1, 0x51, 0xa1]));
        assert!(!c.may_claim(7), "another name's grant is not this one's");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn allow_list_errors_name_the_line() {
        let err = SwitchMap::parse("a = 1\nno separator\n", Path::new("m")).expect_err("bad");
        assert_eq!(
            err.to_string(),
            "m:2: expected `<common name> = <dpid>, ...`"
        );
        let err = SwitchMap::parse("a = 0xzz\n", Path::new("m")).expect_err("bad");
        assert!(err.to_string().starts_with("m:1: bad datapath id"), "{err}");
        assert!(SwitchMap::parse(" = 1\n", Path::new("m")).is_err());
    }

    #[test]
    fn dpid_forms() {
        assert_eq!(parse_dpid("0x51"), Ok(0x51));
        assert_eq!(parse_dpid("0000000000000051"), Ok(0x51));
        assert_eq!(parse_dpid("81"), Ok(81));
        assert!(parse_dpid("fish").is_err());
    }

    #[test]
    fn load_checks_every_file() {
        let dir = pki::test_dir("load");
        pki::init(&dir).expect("init");
        let files = TlsFiles {
            cert: dir.join(pki::CONTROLLER_CERT),
            key: dir.join(pki::CONTROLLER_KEY),
            ca: dir.join(pki::CA_CERT),
            switch_map: None,
        };
        SwitchTls::load(&files).expect("loads");
        let missing = TlsFiles {
            ca: dir.join("nope.pem"),
            ..files.clone()
        };
        let err = SwitchTls::load(&missing).expect_err("missing CA");
        assert!(err.to_string().contains("nope.pem"), "{err}");
        // A key in the certificate's place is refused, not half-loaded.
        let swapped = TlsFiles {
            cert: files.key.clone(),
            ..files
        };
        assert!(SwitchTls::load(&swapped).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
