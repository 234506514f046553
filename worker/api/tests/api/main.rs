//! HTTP tests of dsv3-api over a scripted fake backend and the tiny model's tokenizer.

mod common;

mod cancellation;
mod chat;
mod completions;
mod errors;
mod metrics;
mod operations;
mod reasoning;
mod sampling;
mod streaming;
mod tools;
