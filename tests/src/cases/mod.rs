//! Every end-to-end case, registered in one list. One module per area; to
//! add an area, write `cases/<area>.rs` with a `pub const CASES: &[Case]`
//! and add it to [`all`].

pub mod audit;
pub mod bench_boot;
pub mod blk;
pub mod boot;
pub mod container;
pub mod hostile;
pub mod mcp;
pub mod net;
pub mod run;
pub mod sandbox;
pub mod sandbox_net;
pub mod sandbox_pause;
pub mod secret;
pub mod secret_mcp;
pub mod secret_substitution;
pub mod selftest;
pub mod snapshot;
pub mod tier;
pub mod tier_net;
pub mod tier_stall;
pub mod tier_warm;
pub mod verify;
pub mod vsock;

use crate::case::Case;

/// Every case, in the order they run.
pub fn all() -> Vec<Case> {
    [
        boot::CASES,
        blk::CASES,
        vsock::CASES,
        snapshot::CASES,
        verify::CASES,
        run::CASES,
        audit::CASES,
        secret::CASES,
        secret_substitution::CASES,
        secret_mcp::CASES,
        hostile::CASES,
        net::CASES,
        net::BENCH,
        bench_boot::BENCH,
        selftest::CASES,
        tier::CASES,
        tier_net::CASES,
        tier_stall::CASES,
        tier_warm::CASES,
        container::CASES,
        sandbox::CASES,
        sandbox_net::CASES,
        sandbox_pause::CASES,
        mcp::CASES,
    ]
    .concat()
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_unique_and_area_prefixed() {
        let cases = super::all();
        for (i, c) in cases.iter().enumerate() {
            assert!(c.name.contains('/'), "{} has no area/", c.name);
            assert!(
                cases.iter().skip(i + 1).all(|o| o.name != c.name),
                "duplicate case {}",
                c.name
            );
        }
    }
}
