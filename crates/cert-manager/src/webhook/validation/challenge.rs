//! Challenge (ACME, UPDATE only): the spec is immutable.

use super::{ErrorList, forbidden};
use crate::api::ChallengeSpec;

/// Challenge UPDATE: the spec is immutable.
pub fn validate_challenge_update(old: &ChallengeSpec, new: &ChallengeSpec) -> ErrorList {
    if old == new {
        vec![]
    } else {
        vec![forbidden(
            "spec",
            "challenge spec is immutable after creation",
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::validation::tests::messages;

    #[test]
    fn challenge_immutability() {
        let ch = ChallengeSpec {
            token: "t".into(),
            ..Default::default()
        };
        assert!(validate_challenge_update(&ch, &ch).is_empty());
        let mut other = ch.clone();
        other.token = "u".into();
        assert_eq!(
            messages(&validate_challenge_update(&ch, &other)),
            ["spec: Forbidden: challenge spec is immutable after creation"]
        );
    }
}
