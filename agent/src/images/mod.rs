//! The images this agent brought to its node, and their collection when
//! the disk fills: `ledger` (what it pulled, built or prepulled, last use,
//! pins) and `collect` (which of them to remove under disk pressure, and
//! the task that does it).

pub mod collect;
pub mod ledger;
