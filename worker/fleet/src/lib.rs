//! dsv3-fleet: the serving side of dsv3. A continuous-batching scheduler ([`Fleet`], the HTTP
//! [`dsv3_api::backend::Backend`]) drives attention ranks ([`rank::AttentionRank`]) that reach
//! their routed experts through [`dsv3_engine::ExpertExecutor`] — all in one process (`serve`)
//! or as separate processes over gRPC ([`grpc`]).

pub mod data_plane;
#[cfg(test)]
mod data_plane_tests;
#[cfg(test)]
mod failover_tests;
pub mod grpc;
#[cfg(test)]
mod mutual_tls_tests;
pub mod placed;
pub use dsv3_placement as placement;
pub mod rank;
pub mod rank_metrics;
pub mod sampling_spec;
pub mod scheduler;
pub mod transport;

pub use placed::PlacedExperts;
pub use placement::PlacementPlan;
pub use rank::{AttentionRank, ExpertBackend, LocalAttention, UnavailableExperts, UnservedRows};
pub use scheduler::{Fleet, SchedulerConfig};
pub use transport::{MutualTls, Transport};
