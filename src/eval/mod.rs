//! Evaluation: does a model align? The paper's measures, inside backflow:
//! - pairwise win rates against a baseline, judged by an LLM in both orders ([`judge`]), with
//!   Wilson intervals ([`stats`]);
//! - the likelihood each model gives to reference answers ([`nll`]);
//! - each model's precision and recall as a selector on a labelled dev set (the paper's
//!   Table 7), rating with the `rate` operator's requests.
//!
//! [`run::run`] is the `backflow eval` job; [`devset`] builds a selector dev set from data a
//! user has.

pub mod data;
pub mod devset;
pub mod judge;
pub mod nll;
pub mod rounds;
pub mod run;
pub mod stats;
