//! Redirect rules as the operator writes them, and their encoding as XDP map keys.
//!
//! A rule names one TCP service endpoint (destination address and port) and the clients
//! whose connections to it are steered into the data plane (a source prefix, optionally a
//! single source port). The XDP program matches them with one longest-prefix lookup; see
//! [`ncp_common::RuleKey`] for the key layout.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use ncp_common::{RULE_FIXED_PREFIX_BITS, RuleKey, RuleValue};
use serde::{Deserialize, Serialize};

/// An IPv4 prefix such as `198.18.1.0/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ipv4Prefix {
    /// Network address with the host bits cleared.
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub len: u8,
}

impl Ipv4Prefix {
    /// Builds a prefix, clearing host bits so equal prefixes compare equal.
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Self, RuleError> {
        if len > 32 {
            return Err(RuleError::PrefixLength(len));
        }
        let mask = if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        };
        Ok(Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            len,
        })
    }

    /// Whether `addr` lies inside this prefix.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        Self::new(addr, self.len)
            .map(|p| p.addr == self.addr)
            .unwrap_or(false)
    }
}

impl FromStr for Ipv4Prefix {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().map_err(|_| RuleError::Prefix(s.into()))?),
            None => (s, 32),
        };
        let addr = addr.parse().map_err(|_| RuleError::Prefix(s.into()))?;
        Self::new(addr, len)
    }
}

impl TryFrom<String> for Ipv4Prefix {
    type Error = RuleError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Ipv4Prefix> for String {
    fn from(p: Ipv4Prefix) -> String {
        p.to_string()
    }
}

impl fmt::Display for Ipv4Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Why a rule could not be read or encoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    /// Not `a.b.c.d` or `a.b.c.d/len`.
    #[error("`{0}` is not an IPv4 prefix (expected a.b.c.d or a.b.c.d/len)")]
    Prefix(String),
    /// Prefix length above 32.
    #[error("prefix length {0} is longer than 32")]
    PrefixLength(u8),
    /// Port 0 cannot be matched: it is the "any source port" marker in the map.
    #[error("port 0 cannot be matched; leave the port out to match any")]
    PortZero,
}

/// One redirect rule: TCP from `source` (optionally from `source_port`) to
/// `destination:destination_port` is steered into the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectRule {
    /// Operator-chosen identifier, reported back in listings.
    pub id: u32,
    /// Client prefix; `0.0.0.0/0` matches every client.
    pub source: Ipv4Prefix,
    /// A single client port, or `None` for any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_port: Option<u16>,
    /// The primary's address.
    pub destination: Ipv4Addr,
    /// The primary's TCP port.
    pub destination_port: u16,
}

impl RedirectRule {
    /// Checks the parts the type system cannot.
    pub fn validate(&self) -> Result<(), RuleError> {
        if self.source_port == Some(0) || self.destination_port == 0 {
            return Err(RuleError::PortZero);
        }
        Ok(())
    }

    /// The trie prefix length and key data for this rule.
    ///
    /// The exact fields (destination, destination port, source port or 0 for "any") come
    /// first in the key, the source address last, so the prefix length is 64 plus the
    /// source prefix length, with or without a source port.
    pub fn map_key(&self) -> (u32, RuleKey) {
        let key = RuleKey {
            dst_addr: self.destination.octets(),
            dst_port: self.destination_port.to_be_bytes(),
            src_port: self.source_port.unwrap_or(0).to_be_bytes(),
            src_addr: self.source.addr.octets(),
        };
        (RULE_FIXED_PREFIX_BITS + u32::from(self.source.len), key)
    }

    /// The value stored beside the key.
    pub fn map_value(&self) -> RuleValue {
        RuleValue {
            rule_id: self.id,
            flags: 0,
        }
    }

    /// Software model of the XDP match, used by tests and by `check` to explain a rule.
    pub fn matches(&self, src: Ipv4Addr, src_port: u16, dst: Ipv4Addr, dst_port: u16) -> bool {
        self.destination == dst
            && self.destination_port == dst_port
            && self.source.contains(src)
            && self.source_port.is_none_or(|p| p == src_port)
    }
}

impl fmt::Display for RedirectRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} tcp {}", self.id, self.source)?;
        if let Some(p) = self.source_port {
            write!(f, " port {p}")?;
        }
        write!(f, " -> {}:{}", self.destination, self.destination_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(src: &str, sport: Option<u16>) -> RedirectRule {
        RedirectRule {
            id: 7,
            source: src.parse().unwrap(),
            source_port: sport,
            destination: Ipv4Addr::new(198, 18, 1, 2),
            destination_port: 5201,
        }
    }

    #[test]
    fn prefixes_parse_and_normalise() {
        let p: Ipv4Prefix = "198.18.1.77/24".parse().unwrap();
        assert_eq!(p.to_string(), "198.18.1.0/24");
        assert!(p.contains(Ipv4Addr::new(198, 18, 1, 200)));
        assert!(!p.contains(Ipv4Addr::new(198, 18, 2, 1)));
        assert_eq!("198.18.1.1".parse::<Ipv4Prefix>().unwrap().len, 32);
        assert!(
            "0.0.0.0/0"
                .parse::<Ipv4Prefix>()
                .unwrap()
                .contains(Ipv4Addr::BROADCAST)
        );
        assert_eq!(
            "1.2.3.4/33".parse::<Ipv4Prefix>(),
            Err(RuleError::PrefixLength(33))
        );
        assert!(matches!(
            "1.2.3/8".parse::<Ipv4Prefix>(),
            Err(RuleError::Prefix(_))
        ));
        assert!(matches!(
            "1.2.3.4/x".parse::<Ipv4Prefix>(),
            Err(RuleError::Prefix(_))
        ));
    }

    #[test]
    fn keys_put_exact_fields_first() {
        let (len, key) = rule("198.18.1.0/24", None).map_key();
        assert_eq!(len, 64 + 24);
        assert_eq!(key.dst_addr, [198, 18, 1, 2]);
        assert_eq!(key.dst_port, 5201u16.to_be_bytes());
        assert_eq!(key.src_port, [0, 0]);
        assert_eq!(key.src_addr, [198, 18, 1, 0]);
        let (len, key) = rule("198.18.1.9/32", Some(4000)).map_key();
        assert_eq!(len, 96);
        assert_eq!(key.src_port, 4000u16.to_be_bytes());
    }

    #[test]
    fn software_match_follows_the_rule() {
        let r = rule("198.18.1.0/24", None);
        let dst = Ipv4Addr::new(198, 18, 1, 2);
        assert!(r.matches(Ipv4Addr::new(198, 18, 1, 1), 999, dst, 5201));
        assert!(!r.matches(Ipv4Addr::new(198, 18, 1, 1), 999, dst, 5202));
        assert!(!r.matches(Ipv4Addr::new(198, 18, 9, 1), 999, dst, 5201));
        let r = rule("198.18.1.1/32", Some(1234));
        assert!(r.matches(Ipv4Addr::new(198, 18, 1, 1), 1234, dst, 5201));
        assert!(!r.matches(Ipv4Addr::new(198, 18, 1, 1), 1235, dst, 5201));
    }

    #[test]
    fn port_zero_is_refused() {
        assert_eq!(
            rule("0.0.0.0/0", Some(0)).validate(),
            Err(RuleError::PortZero)
        );
        let mut r = rule("0.0.0.0/0", None);
        assert_eq!(r.validate(), Ok(()));
        r.destination_port = 0;
        assert_eq!(r.validate(), Err(RuleError::PortZero));
    }
}
