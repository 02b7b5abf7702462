//! Change IDs in VMware's shape on this API:
//! `52 de c0 d9 b9 43 9d 10-61 d5 4c 1b e9 7b 65 63/81` (the tracking
//! session's 16 bytes as hex pairs, a `-` after the 8th, `/`, the sequence).
//! The host speaks `<uuid>/<seq>`; these two functions are the only place
//! that converts (to become `tracker::ChangeId::vmware()` later).

use tracker::ChangeId;
use uuid::Uuid;

/// The VMware shape of a host change ID; anything that is not one is
/// returned unchanged.
pub fn to_vmware(id: &str) -> String {
    let Ok(c) = id.parse::<ChangeId>() else {
        return id.to_owned();
    };
    let b = c.session.as_bytes();
    let hex = |s: &[u8]| s.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ");
    format!("{}-{}/{}", hex(&b[..8]), hex(&b[8..]), c.seq)
}

/// The host's form of a change ID given in VMware's shape. `*`, the host's
/// own form, and anything malformed are passed on unchanged, so the host
/// judges them (a malformed one is its typed error).
pub fn from_vmware(id: &str) -> String {
    let id = id.trim();
    let Some((session, seq)) = id.split_once('/') else {
        return id.to_owned();
    };
    if !session.contains(' ') {
        return id.to_owned();
    }
    let hex: String = session.chars().filter(|c| *c != ' ' && *c != '-').collect();
    let shaped = session.len() == 16 * 3 - 1 && session.as_bytes().get(23) == Some(&b'-');
    match (shaped, Uuid::try_parse(&hex)) {
        (true, Ok(u)) if hex.len() == 32 => format!("{}/{seq}", u.hyphenated()),
        _ => id.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shapes_round_trip() {
        let host = "52dec0d9-b943-9d10-61d5-4c1be97b6563/81";
        let vmware = to_vmware(host);
        assert_eq!(vmware, "52 de c0 d9 b9 43 9d 10-61 d5 4c 1b e9 7b 65 63/81");
        assert_eq!(from_vmware(&vmware), host);
        assert_eq!(from_vmware(host), host);
        assert_eq!(from_vmware("*"), "*");
        for bad in [
            "52 de c0/81",
            "52 de c0 d9 b9 43 9d 10 61 d5 4c 1b e9 7b 65 63/81",
            "zz de c0 d9 b9 43 9d 10-61 d5 4c 1b e9 7b 65 63/81",
            "nonsense",
        ] {
            assert_eq!(from_vmware(bad), bad);
            assert!(from_vmware(bad).parse::<ChangeId>().is_err());
        }
        assert_eq!(to_vmware("garbage"), "garbage");
    }
}
