//! The method's own pieces (paper: Li et al., "Self-Alignment with Instruction Backtranslation"):
//! the prompts, verbatim, and the robust parsing of self-ratings.

pub mod prompts;
pub mod score;
