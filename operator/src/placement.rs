//! The expert placement plan, from the crate the workers read it with: one algorithm, one
//! version hash, one JSON format on both sides of the ConfigMap.

pub use dsv3_placement::balanced::{plan, LayoutError as PlacementError, PlacementInput};
pub use dsv3_placement::PlacementPlan;
