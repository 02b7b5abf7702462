//! Change IDs: `<tracking-session uuid>/<sequence>`.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// A point in a disk's change history, as handed to backup applications.
///
/// Printed as `<session uuid>/<sequence>`, for example
/// `7f9c1a52-3e0b-4d8e-9a41-0c2f5b6d7e81/12`. The session UUID changes when
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
        let session = Uuid::try_parse(uuid.trim()).map_err(|_| err("the session part is not a UUID"))?;
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
        let e = "nope".parse::<ChangeId>().unwrap_err();
        assert!(e.to_string().contains("nope"));
    }
}
