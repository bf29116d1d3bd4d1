//! The method's own pieces (paper: Li et al., "Self-Alignment with Instruction Backtranslation"):
//! the prompts, verbatim, the robust parsing of self-ratings, and the rounds of the loop with the
//! model versions that travel between them.

pub mod assets;
pub mod prompts;
pub mod rounds;
pub mod score;
