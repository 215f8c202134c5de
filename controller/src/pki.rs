//! A small certificate authority for OpenFlow over TLS, writing PEM files in the form
//! Open vSwitch takes (`ovs-vsctl set-ssl <privkey> <cert> <cacert>`).
//!
//! One CA signs both sides: ncpd's certificate (which switches check against the CA they
//! were given) and each switch's certificate (which ncpd checks against the same CA). A
//! switch certificate names the datapath ids it may claim as subject-alternative-name URIs
//! `dpid:<16 hex digits>` (see [`crate::switch::tls`] for the rule and for certificates
//! made with OVS's own `ovs-pki`, which carry none).
//!
//! Files in the directory:
//!
//! | file | what |
//! |---|---|
//! | `cacert.pem`, `ca-privkey.pem` | the CA (keep the key off the switches) |
//! | `ctl-cert.pem`, `ctl-privkey.pem` | ncpd's `--tls-cert` / `--tls-key` |
//! | `<name>-cert.pem`, `<name>-privkey.pem` | a switch's certificate and key |

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::topology::Dpid;

pub const CA_CERT: &str = "cacert.pem";
pub const CA_KEY: &str = "ca-privkey.pem";
pub const CONTROLLER_CERT: &str = "ctl-cert.pem";
pub const CONTROLLER_KEY: &str = "ctl-privkey.pem";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} exists already; not overwriting a key or certificate")]
    Exists(PathBuf),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("bad certificate name {0:?}: use letters, digits, '-', '_' and '.'")]
    BadName(String),
    #[error("a switch certificate must name at least one datapath id")]
    NoDpid,
}

/// The SAN URI that lets a switch certificate claim `dpid`.
pub fn dpid_uri(dpid: Dpid) -> String {
    format!("dpid:{dpid:016x}")
}

/// A key and certificate pair written to disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `text` to a new file; keys get mode 0600.
fn write_new(path: &Path, text: &str, private: bool) -> Result<(), PkiError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => PkiError::Exists(path.to_path_buf()),
            _ => PkiError::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
    f.write_all(text.as_bytes()).map_err(io_err(path))
}

fn must_be_absent(paths: &[&Path]) -> Result<(), PkiError> {
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(PkiError::Exists(p.to_path_buf())),
        None => Ok(()),
    }
}

fn leaf_params(name: &str, sans: Vec<SanType>) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "NCP");
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Both purposes: a switch is the TLS client and the controller the server, and
    // OpenSSL (OVS) as well as rustls check the purpose when the extension is present.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params
}

fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(name.to_string()))
    }
}

/// Creates `dir` with a new CA and ncpd's certificate. Refuses to overwrite any of them.
pub fn init(dir: &Path) -> Result<Issued, PkiError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let paths = [CA_CERT, CA_KEY, CONTROLLER_CERT, CONTROLLER_KEY].map(|f| dir.join(f));
    must_be_absent(&paths.each_ref().map(PathBuf::as_path))?;
    let [ca_cert, ca_key, ctl_cert, ctl_key] = paths;

    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "NCP OpenFlow CA");
    ca.distinguished_name.push(DnType::OrganizationName, "NCP");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pair = KeyPair::generate()?;
    let ca_self = ca.self_signed(&ca_pair)?;
    write_new(&ca_key, &ca_pair.serialize_pem(), true)?;
    write_new(&ca_cert, &ca_self.pem(), false)?;

    let issuer = Issuer::new(ca, ca_pair);
    let ctl = leaf_params("ncpd", vec![SanType::DnsName("ncpd".try_into()?)]);
    let ctl_pair = KeyPair::generate()?;
    let signed = ctl.signed_by(&ctl_pair, &issuer)?;
    write_new(&ctl_key, &ctl_pair.serialize_pem(), true)?;
    write_new(&ctl_cert, &signed.pem(), false)?;
    Ok(Issued {
        cert: ctl_cert,
        key: ctl_key,
    })
}

/// Signs a new key and certificate for switch `name`, allowed to claim `dpids`, with the
/// CA in `dir` (made by [`init`]).
pub fn switch(dir: &Path, name: &str, dpids: &[Dpid]) -> Result<Issued, PkiError> {
    check_name(name)?;
    if dpids.is_empty() {
        return Err(PkiError::NoDpid);
    }
    let cert = dir.join(format!("{name}-cert.pem"));
    let key = dir.join(format!("{name}-privkey.pem"));
    must_be_absent(&[&cert, &key])?;
    let ca_key_path = dir.join(CA_KEY);
    let ca_cert_path = dir.join(CA_CERT);
    let ca_key = std::fs::read_to_string(&ca_key_path).map_err(io_err(&ca_key_path))?;
    let ca_cert = std::fs::read_to_string(&ca_cert_path).map_err(io_err(&ca_cert_path))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, KeyPair::from_pem(&ca_key)?)?;

    let sans = dpids
        .iter()
        .map(|&d| Ok(SanType::URI(dpid_uri(d).try_into()?)))
        .collect::<Result<Vec<_>, rcgen::Error>>()?;
    let pair = KeyPair::generate()?;
    let signed = leaf_params(name, sans).signed_by(&pair, &issuer)?;
    write_new(&key, &pair.serialize_pem(), true)?;
    write_new(&cert, &signed.pem(), false)?;
    Ok(Issued { cert, key })
}

/// A throwaway directory for tests of this module and its users.
#[cfg(test)]
pub(crate) fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ncp-pki-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn init_then_switch_writes_pem_files_and_refuses_to_overwrite() {
        let dir = test_dir("files");
        let ctl = init(&dir).expect("init");
        assert!(matches!(init(&dir), Err(PkiError::Exists(_))));
        let sw = switch(&dir, "sw51", &[0x51, 0xa1]).expect("switch");
        for p in [&ctl.cert, &sw.cert, &dir.join(CA_CERT)] {
            let text = std::fs::read_to_string(p).expect("read");
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{p:?}");
        }
        for p in [&ctl.key, &sw.key, &dir.join(CA_KEY)] {
            let mode = std::fs::metadata(p).expect("stat").permissions().mode();
            assert_eq!(mode & 0o077, 0, "{p:?} must be owner-only");
        }
        assert!(matches!(
            switch(&dir, "sw51", &[0x51]),
            Err(PkiError::Exists(_))
        ));
        assert!(matches!(switch(&dir, "x", &[]), Err(PkiError::NoDpid)));
        assert!(matches!(
            switch(&dir, "../x", &[1]),
            Err(PkiError::BadName(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn switch_without_a_ca_fails_clearly() {
        let dir = test_dir("noca");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let err = switch(&dir, "sw", &[1]).expect_err("no CA");
        assert!(err.to_string().contains(CA_KEY), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
