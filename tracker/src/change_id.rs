//! Change IDs: `<tracking-session uuid>/<sequence>`.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// A point in a disk's change history, as handed to backup applications.
///
/// Printed as `<session uuid>/<sequence>`, for example
/// `7f9c1a52-3e0b-4d8e-9a41-0c2f5b6d7e81/12`, or in VMware's shape with
/// [`vmware`](Self::vmware): `7f 9c 1a 52 3e 0b 4d 8e-9a 41 0c 2f 5b 6d 7e 81/12`
/// (the session's 16 bytes as hex pairs, a dash after the eighth). Both
/// shapes parse. The session UUID changes when
/// tracking is reset (CBT turned off and on, unclean shutdown), which makes
/// every earlier change ID fail with a typed error instead of answering
/// wrongly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChangeId {
    /// The tracking session that issued it.
    pub session: Uuid,
    /// The epoch it closed: writes after it have a higher epoch.
    pub seq: u64,
}

impl fmt::Display for ChangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.session.hyphenated(), self.seq)
    }
}

impl ChangeId {
    /// VMware's shape: `52 de c0 d9 b9 43 9d 10-61 d5 4c 1b e9 7b 65 63/81`.
    pub fn vmware(&self) -> String {
        let b = self.session.as_bytes();
        let hex = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ");
        format!("{}-{}/{}", hex(0..8), hex(8..16), self.seq)
    }
}

/// Parses VMware's session shape: 16 hex pairs separated by single spaces,
/// with a dash instead of the space after the eighth.
fn parse_vmware_session(s: &str) -> Option<Uuid> {
    let (a, b) = s.split_once('-')?;
    let mut bytes = [0u8; 16];
    let pairs: Vec<&str> = a.split(' ').chain(b.split(' ')).collect();
    if pairs.len() != 16 || a.split(' ').count() != 8 {
        return None;
    }
    for (out, p) in bytes.iter_mut().zip(pairs) {
        if p.len() != 2 {
            return None;
        }
        *out = u8::from_str_radix(p, 16).ok()?;
    }
    Some(Uuid::from_bytes(bytes))
}

/// A string that is not a change ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed change ID {input:?}: {reason}")]
pub struct ParseChangeIdError {
    /// What was given.
    pub input: String,
    /// What was wrong with it.
    pub reason: &'static str,
}

impl FromStr for ChangeId {
    type Err = ParseChangeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseChangeIdError {
            input: s.to_owned(),
            reason,
        };
        let (uuid, seq) = s
            .split_once('/')
            .ok_or_else(|| err("expected <session uuid>/<sequence>"))?;
        let uuid = uuid.trim();
        let session = match uuid.contains(' ') {
            true => parse_vmware_session(uuid),
            false => Uuid::try_parse(uuid).ok(),
        }
        .ok_or_else(|| err("the session part is not a UUID (nor VMware's 16 hex pairs)"))?;
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err("the sequence part is not a decimal number"));
        }
        let seq = seq.parse().map_err(|_| err("the sequence number is too large"))?;
        Ok(Self { session, seq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejects_garbage() {
        let id = ChangeId {
            session: Uuid::new_v4(),
            seq: 81,
        };
        assert_eq!(id.to_string().parse::<ChangeId>().unwrap(), id);
        for bad in [
            "",
            "*",
            "abc/1",
            "52 de c0/81",
            &format!("{}/", id.session),
            &format!("{}/-1", id.session),
            &format!("{}/1x", id.session),
        ] {
            assert!(bad.parse::<ChangeId>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(id.vmware().parse::<ChangeId>().unwrap(), id);
        let vmw: ChangeId = "52 de c0 d9 b9 43 9d 10-61 d5 4c 1b e9 7b 65 63/81".parse().unwrap();
        assert_eq!(vmw.to_string(), "52dec0d9-b943-9d10-61d5-4c1be97b6563/81");
        assert_eq!(vmw.vmware(), "52 de c0 d9 b9 43 9d 10-61 d5 4c 1b e9 7b 65 63/81");
        for bad in [
            "52 de c0 d9 b9 43 9d 10 61 d5 4c 1b e9 7b 65 63/81",
            "52 de c0 d9 b9 43 9d-10 61 d5 4c 1b e9 7b 65 63/81",
            "52 de c0 d9 b9 43 9d 10-61 d5 4c 1b e9 7b 65/81",
            "52 de c0 d9 b9 43 9d 1g-61 d5 4c 1b e9 7b 65 63/81",
            "52  de c0 d9 b9 43 9d 10-61 d5 4c 1b e9 7b 65 63/81",
        ] {
            assert!(bad.parse::<ChangeId>().is_err(), "{bad:?} parsed");
        }
        let e = "nope".parse::<ChangeId>().unwrap_err();
        assert!(e.to_string().contains("nope"));
    }
}
