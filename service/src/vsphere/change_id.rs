//! Change IDs in VMware's shape on this API:
//! `52 de c0 d9 b9 43 9d 10-61 d5 4c 1b e9 7b 65 63/81` (the tracking
//! session's 16 bytes as hex pairs, a `-` after the 8th, `/`, the sequence).
//! The host prints `<uuid>/<seq>` and parses both shapes
//! ([`tracker::ChangeId`]), so only the way out needs converting.

use tracker::ChangeId;

/// The VMware shape of a host change ID; anything that is not one is
/// returned unchanged.
pub fn to_vmware(id: &str) -> String {
    match id.parse::<ChangeId>() {
        Ok(c) => c.vmware(),
        Err(_) => id.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_reads_back_what_the_api_prints() {
        let host = "52dec0d9-b943-9d10-61d5-4c1be97b6563/81";
        let vmware = to_vmware(host);
        assert_eq!(vmware, "52 de c0 d9 b9 43 9d 10-61 d5 4c 1b e9 7b 65 63/81");
        assert_eq!(vmware.parse::<ChangeId>().unwrap().to_string(), host);
        assert_eq!(to_vmware("garbage"), "garbage");
        assert_eq!(to_vmware("*"), "*");
    }
}
