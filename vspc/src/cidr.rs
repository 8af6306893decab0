//! Address ranges in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`) and the
//! proxy port's allow-list made of them (`--proxy-allow`).
//!
//! A dozen lines of bit masking, written here rather than taken from a
//! crate: the daemon needs parsing, one membership test and a clear error,
//! nothing more (no sets, no arithmetic), and every extra crate is one
//! more thing to audit on an access-control path.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One address range: an address whose bits past `prefix` are zero, and
/// the number of leading bits that must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address (host bits zero), IPv4 or IPv6.
    net: IpAddr,
    /// Leading bits that must match: at most 32 for IPv4, 128 for IPv6.
    prefix: u8,
}

/// The mask of `prefix` leading ones in a `bits`-bit address, as u128.
fn mask(prefix: u8, bits: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        (u128::MAX << (bits - prefix)) & (u128::MAX >> (128 - u32::from(bits)))
    }
}

/// The address as bits, with its width.
fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

impl Cidr {
    /// True if `ip` lies in this range. An IPv4 address seen through an
    /// IPv6 socket (`::ffff:10.1.2.3`, a proxy port on `::`) counts as the
    /// IPv4 address it is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let (a, width) = bits(ip);
        let (n, net_width) = bits(self.net);
        width == net_width && (a & mask(self.prefix, width)) == n
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `ADDR/BITS`, or a bare address (one host: /32 or /128). Host bits
    /// set (`10.1.2.3/8`) are an error that suggests the network meant,
    /// because such a typo usually means a wrong allow-list.
    fn from_str(s: &str) -> Result<Cidr, String> {
        let text = s.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| {
            format!("'{s}' is not a CIDR range: '{addr}' is not an IP address (write e.g. 10.0.0.0/8 or 2001:db8::/32)")
        })?;
        let (value, width) = bits(ip);
        let prefix = match prefix {
            None => width,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= width => n,
                _ => {
                    return Err(format!(
                        "'{s}' is not a CIDR range: the prefix length must be a number from 0 to {width}"
                    ))
                }
            },
        };
        let masked = value & mask(prefix, width);
        if masked != value {
            let net = match ip {
                IpAddr::V4(_) => IpAddr::from(u32::try_from(masked).unwrap_or(0).to_be_bytes()),
                IpAddr::V6(_) => IpAddr::from(masked.to_be_bytes()),
            };
            return Err(format!(
                "'{s}' is not a CIDR range: it has host bits set (did you mean {net}/{prefix}?)"
            ));
        }
        Ok(Cidr { net: ip, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// Who may connect to a listener: anyone when empty, else addresses in
/// one of the ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    /// The ranges, in the order given; empty allows everyone.
    ranges: Vec<Cidr>,
}

impl AllowList {
    pub fn new(ranges: Vec<Cidr>) -> AllowList {
        AllowList { ranges }
    }

    /// True if `ip` may connect.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.ranges.is_empty() || self.ranges.iter().any(|r| r.contains(ip))
    }

    /// True if there is no restriction.
    pub fn is_open(&self) -> bool {
        self.ranges.is_empty()
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text: Vec<String> = self.ranges.iter().map(Cidr::to_string).collect();
        f.write_str(&text.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn parses_v4_v6_and_bare_hosts() {
        assert_eq!(c("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(c(" 192.168.1.7 ").to_string(), "192.168.1.7/32");
        assert_eq!(c("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(c("::1").to_string(), "::1/128");
        assert_eq!(c("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(c("::/0").to_string(), "::/0");
    }

    #[test]
    fn bad_ranges_say_what_is_wrong() {
        let e = "10.0.0.0/33".parse::<Cidr>().unwrap_err();
        assert!(e.contains("'10.0.0.0/33'") && e.contains("0 to 32"), "{e}");
        let e = "::/129".parse::<Cidr>().unwrap_err();
        assert!(e.contains("0 to 128"), "{e}");
        let e = "10.0.0/8".parse::<Cidr>().unwrap_err();
        assert!(e.contains("not an IP address"), "{e}");
        let e = "10.1.2.3/8".parse::<Cidr>().unwrap_err();
        assert!(e.contains("did you mean 10.0.0.0/8"), "{e}");
        let e = "2001:db8::1/32".parse::<Cidr>().unwrap_err();
        assert!(e.contains("did you mean 2001:db8::/32"), "{e}");
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
        assert!("10.0.0.0/-1".parse::<Cidr>().is_err());
        assert!("".parse::<Cidr>().is_err());
    }

    #[test]
    fn matching() {
        let r = c("10.20.0.0/16");
        assert!(r.contains(ip("10.20.0.1")));
        assert!(r.contains(ip("10.20.255.255")));
        assert!(!r.contains(ip("10.21.0.1")));
        assert!(!r.contains(ip("::1")), "IPv6 never matches an IPv4 range");
        assert!(
            r.contains(ip("::ffff:10.20.3.4")),
            "an IPv4-mapped address is its IPv4 address"
        );
        assert!(c("127.0.0.1/32").contains(ip("127.0.0.1")));
        assert!(!c("127.0.0.1/32").contains(ip("127.0.0.2")));
        assert!(c("0.0.0.0/0").contains(ip("203.0.113.9")));
        let v6 = c("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        assert!(c("::/0").contains(ip("fe80::1")));
        assert!(c("fe80::1").contains(ip("fe80::1")));
    }

    #[test]
    fn allow_lists() {
        let open = AllowList::default();
        assert!(open.is_open() && open.allows(ip("198.51.100.1")));
        let l = AllowList::new(vec![c("127.0.0.1/32"), c("fd00::/8")]);
        assert!(l.allows(ip("127.0.0.1")));
        assert!(l.allows(ip("fd12::3")));
        assert!(!l.allows(ip("127.0.0.2")));
        assert_eq!(l.to_string(), "127.0.0.1/32,fd00::/8");
    }
}
