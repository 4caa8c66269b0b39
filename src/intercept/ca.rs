//! The local certificate authority of transparent mode (README "Clients that cannot change
//! their URL"): created once by `zoho-desk-proxy ca init`, name-constrained to the
//! intercepted Zoho host names and to no IP address at all, so that its key, if stolen,
//! cannot impersonate any other site; and the leaf certificates it signs, one per host,
//! minted when a client first names the host (SNI) and kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    NameConstraints,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The CA certificate's file in the CA directory (public: clients trust it).
pub const CA_CERT: &str = "ca.pem";
/// The CA key's file (mode 0600).
pub const CA_KEY: &str = "ca-key.pem";
/// What the CA calls itself.
const CA_NAME: &str = "zoho-desk-proxy local CA";

/// Why the CA cannot be made or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA is there already and `--force` was not given.
    #[error(
        "{0} already holds a CA; give --force to replace it (clients that trust the old one must trust the new one)"
    )]
    Exists(PathBuf),
    /// No CA in the directory.
    #[error("no CA in {0}: create one with `zoho-desk-proxy ca init`")]
    Missing(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA's name constraints do not cover an intercepted host (added after `ca init`).
    #[error(
        "the CA in {dir} cannot vouch for {host} (its name constraints predate it): make a new one with `zoho-desk-proxy ca init --force`, and have clients trust it"
    )]
    Uncovered {
        /// The CA directory.
        dir: PathBuf,
        /// The host.
        host: String,
    },
    /// The key is not the certificate's (a `ca init --force` cut between its two files,
    /// or files copied from two CAs).
    #[error(
        "{0}: ca-key.pem is not the key of ca.pem, so no client would accept a certificate it signs: make a new CA with `zoho-desk-proxy ca init --force`, and have clients trust it"
    )]
    KeyMismatch(PathBuf),
    /// A certificate or key could not be made or read.
    #[error("{0}")]
    Cert(String),
}

/// Says so when the CA's key can be read by users other than the proxy's (`ca init`
/// makes it 0600): anyone who reads it can impersonate the intercepted hosts to the
/// clients that trust the CA.
fn warn_if_readable_by_others(key_path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(key_path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                key = %key_path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the CA's key can be read by other users: `chmod 600` it (anyone who reads it can impersonate the intercepted hosts to clients that trust the CA)"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = key_path;
}

fn cert_error(err: impl std::fmt::Display) -> CaError {
    CaError::Cert(err.to_string())
}

/// The CA's certificate parameters: a CA for `hosts` only (not the names below them),
/// and for no IP address.
fn ca_params(hosts: &[String]) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    name.push(DnType::OrganizationName, "zoho-desk-proxy");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // The leaves' one use: a server's certificate. A CA's EKU narrows what its leaves
    // are good for (OpenSSL checks it), so a stolen key cannot make a client's or an
    // e-mail certificate.
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.name_constraints = Some(NameConstraints {
        // And no e-mail address: "invalid" is a domain no mailbox has (RFC 2606).
        permitted_subtrees: hosts
            .iter()
            .map(|h| GeneralSubtree::DnsName(h.clone()))
            .chain([GeneralSubtree::Rfc822Name("invalid".into())])
            .collect(),
        // A DNS constraint also permits every name below it; a leading dot names those
        // only (as OpenSSL, Go, NSS and webpki read it), and they are excluded — unless
        // one of them is intercepted too.
        excluded_subtrees: hosts
            .iter()
            .map(|h| format!(".{h}"))
            .filter(|below| !hosts.iter().any(|other| other.ends_with(below.as_str())))
            .map(GeneralSubtree::DnsName)
            .chain([
                GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
                GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
            ])
            .collect(),
    });
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    params
}

/// Creates a CA in `dir` for `hosts`: `ca.pem` (readable by all) and `ca-key.pem` (mode
/// 0600). Refuses to replace one unless `force`. Returns the certificate's path.
pub fn init(dir: &Path, hosts: &[String], force: bool) -> Result<PathBuf, CaError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    if !force && (cert_path.exists() || key_path.exists()) {
        return Err(CaError::Exists(dir.to_owned()));
    }
    let key = KeyPair::generate().map_err(cert_error)?;
    let cert = ca_params(hosts).self_signed(&key).map_err(cert_error)?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CaError::Io { path, source }
    };
    create_private_dir(dir).map_err(io(dir))?;
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600).map_err(io(&key_path))?;
    write_file(&cert_path, cert.pem().as_bytes(), 0o644).map_err(io(&cert_path))?;
    Ok(cert_path)
}

/// The DNS names a CA certificate's name constraints permit and exclude.
#[derive(Debug)]
struct DnsConstraints {
    permitted: Vec<String>,
    excluded: Vec<String>,
}

/// A CA certificate's DNS name constraints (`None`: it has none, and permits all).
fn dns_constraints(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<Option<DnsConstraints>, CaError> {
    use x509_parser::extensions::{GeneralName, GeneralSubtree};
    let constraints = cert.name_constraints().map_err(cert_error)?;
    let names = |subtrees: &Option<Vec<GeneralSubtree<'_>>>| -> Vec<String> {
        subtrees
            .iter()
            .flatten()
            .filter_map(|subtree| match subtree.base {
                GeneralName::DNSName(name) => Some(name.to_ascii_lowercase()),
                _ => None,
            })
            .collect()
    };
    Ok(constraints.map(|constraints| DnsConstraints {
        permitted: names(&constraints.value.permitted_subtrees),
        excluded: names(&constraints.value.excluded_subtrees),
    }))
}

/// Whether `host` is within a DNS name constraint: the name and the names below it, or,
/// for `.name`, the names below it only.
fn within(constraint: &str, host: &str) -> bool {
    match constraint.strip_prefix('.') {
        Some(_) => host.ends_with(constraint),
        None => {
            host == constraint
                || host
                    .strip_suffix(constraint)
                    .is_some_and(|rest| rest.ends_with('.'))
        }
    }
}

/// Whether a CA's DNS name constraints let it vouch for `host`.
fn covers(constraints: &Option<DnsConstraints>, host: &str) -> bool {
    let Some(constraints) = constraints else {
        return true;
    };
    (constraints.permitted.is_empty() || constraints.permitted.iter().any(|c| within(c, host)))
        && !constraints.excluded.iter().any(|c| within(c, host))
}

/// The CA loaded from its directory, and the leaf certificates it has minted.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    /// One key for every leaf: minting a leaf then costs one signature.
    leaf_key: KeyPair,
    /// Host names a leaf may be minted for.
    hosts: Vec<String>,
    leaves: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("hosts", &self.hosts)
            .finish()
    }
}

impl LocalCa {
    /// Loads the CA of `dir`, to mint leaves for `hosts` only.
    pub fn load(dir: &Path, hosts: Vec<String>) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        if !cert_path.exists() || !key_path.exists() {
            return Err(CaError::Missing(dir.to_owned()));
        }
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CaError::Io {
                path: path.to_owned(),
                source,
            })
        };
        let cert_pem = read(&cert_path)?;
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(cert_error)?;
        let ca_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(cert_error)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&ca_der).map_err(cert_error)?;
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        {
            return Err(CaError::KeyMismatch(dir.to_owned()));
        }
        warn_if_readable_by_others(&key_path);
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(cert_error)?;
        let constraints = dns_constraints(&parsed)?;
        if let Some(host) = hosts.iter().find(|host| !covers(&constraints, host)) {
            return Err(CaError::Uncovered {
                dir: dir.to_owned(),
                host: host.clone(),
            });
        }
        if constraints.as_ref().is_some_and(|c| c.excluded.is_empty()) {
            tracing::warn!(dir = %dir.display(), "the CA was made by an earlier version: its name constraints also let it vouch for the names below the intercepted hosts; make a new one with `zoho-desk-proxy ca init --force`, and have clients trust it");
        }
        Ok(Self {
            issuer,
            ca_der,
            leaf_key: KeyPair::generate().map_err(cert_error)?,
            hosts,
            leaves: Mutex::default(),
        })
    }

    /// The leaf for `host` (lower case), minted on first use; `None` for a host that is
    /// not intercepted.
    pub fn leaf(&self, host: &str) -> Option<Arc<CertifiedKey>> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if !self.hosts.contains(&host) {
            return None;
        }
        let mut leaves = self
            .leaves
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(leaf) = leaves.get(&host) {
            return Some(Arc::clone(leaf));
        }
        match self.mint(&host) {
            Ok(leaf) => {
                let leaf = Arc::new(leaf);
                leaves.insert(host, Arc::clone(&leaf));
                Some(leaf)
            }
            Err(err) => {
                tracing::error!(%host, error = %err, "intercept: a certificate could not be minted");
                None
            }
        }
    }

    /// A leaf certificate for `host`, signed by the CA, with the CA in its chain.
    pub fn mint(&self, host: &str) -> Result<CertifiedKey, CaError> {
        let mut params = CertificateParams::new(vec![host.to_owned()]).map_err(cert_error)?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, host);
        params.distinguished_name = name;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(365);
        let leaf = params
            .signed_by(&self.leaf_key, &self.issuer)
            .map_err(cert_error)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(cert_error)?;
        Ok(CertifiedKey::new(
            vec![leaf.der().clone(), self.ca_der.clone()],
            signer,
        ))
    }
}

/// Chooses the leaf by the client's SNI: none for a hello without SNI or for a host that
/// is not intercepted, and the handshake fails.
impl ResolvesServerCert for LocalCa {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            Some(name) => {
                let leaf = self.leaf(name);
                if leaf.is_none() {
                    tracing::warn!(
                        sni = name,
                        "intercept: TLS refused: the client named a host that is not intercepted"
                    );
                }
                leaf
            }
            None => {
                tracing::warn!("intercept: TLS refused: the client named no host (no SNI)");
                None
            }
        }
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Writes a file whole with `mode`, through a temporary file and a rename.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut temp, bytes)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        temp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|h| (*h).to_owned()).collect()
    }

    #[test]
    fn the_ca_is_for_servers_and_no_e_mail_address() {
        use x509_parser::extensions::GeneralName;
        let key = KeyPair::generate().unwrap();
        let cert = ca_params(&hosts(&["desk.zoho.com"]))
            .self_signed(&key)
            .unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth && !eku.email_protection);
        let constraints = parsed.name_constraints().unwrap().unwrap().value;
        let permitted = constraints.permitted_subtrees.as_ref().unwrap();
        assert!(
            permitted
                .iter()
                .any(|s| matches!(s.base, GeneralName::RFC822Name("invalid")))
        );
    }

    #[test]
    fn a_host_added_after_ca_init_is_refused_at_load_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        init(
            dir.path(),
            &hosts(&["desk.zoho.com", "accounts.zoho.com"]),
            false,
        )
        .unwrap();
        assert!(LocalCa::load(dir.path(), hosts(&["desk.zoho.com", "accounts.zoho.com"])).is_ok());
        let err = LocalCa::load(dir.path(), hosts(&["desk.zoho.com", "desk.zoho.eu"]))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("desk.zoho.eu") && err.contains("ca init --force"),
            "{err}"
        );
    }

    #[test]
    fn a_key_that_is_not_the_certificate_s_is_refused_at_load() {
        // `ca init --force` cut between its two renames, or files of two CAs: every
        // client would have refused the leaves, and the proxy had started silently.
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let names = hosts(&["desk.zoho.com"]);
        init(a.path(), &names, false).unwrap();
        init(b.path(), &names, false).unwrap();
        assert!(LocalCa::load(a.path(), names.clone()).is_ok());
        std::fs::copy(b.path().join(CA_KEY), a.path().join(CA_KEY)).unwrap();
        let err = LocalCa::load(a.path(), names).err().unwrap();
        assert!(matches!(err, CaError::KeyMismatch(_)), "{err}");
        assert!(err.to_string().contains("ca init --force"), "{err}");
    }

    #[test]
    fn name_constraints_cover_what_they_permit_and_do_not_exclude() {
        // A CA of an earlier version: the name and the names below it.
        let earlier = Some(DnsConstraints {
            permitted: hosts(&["desk.zoho.com"]),
            excluded: Vec::new(),
        });
        assert!(covers(&earlier, "desk.zoho.com"));
        assert!(covers(&earlier, "eu.desk.zoho.com"));
        assert!(!covers(&earlier, "evildesk.zoho.com"));
        assert!(!covers(&earlier, "zoho.com"));
        assert!(covers(&None, "anything.example"));
        // Today's: the name only.
        let constraints_of = |hosts: &[String]| {
            let key = KeyPair::generate().unwrap();
            let cert = ca_params(hosts).self_signed(&key).unwrap();
            let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
            dns_constraints(&parsed).unwrap()
        };
        let today = constraints_of(&hosts(&["desk.zoho.com"]));
        assert!(covers(&today, "desk.zoho.com"));
        assert!(!covers(&today, "eu.desk.zoho.com"));
        assert!(!covers(&today, "evildesk.zoho.com"));
        // A host below another intercepted one stays permitted.
        let both = hosts(&["zoho.example", "desk.zoho.example"]);
        let nested = constraints_of(&both);
        assert!(both.iter().all(|h| covers(&nested, h)));
    }

    #[test]
    fn leaves_are_minted_for_intercepted_hosts_only_and_cached() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &hosts(&["desk.zoho.com"]), false).unwrap();
        let ca = LocalCa::load(dir.path(), hosts(&["desk.zoho.com"])).unwrap();
        let first = ca.leaf("DESK.zoho.com.").unwrap();
        assert!(Arc::ptr_eq(&first, &ca.leaf("desk.zoho.com").unwrap()));
        assert!(ca.leaf("evil.example").is_none());
    }
}
