//! The prompts of the method, verbatim from the paper (../shared/humpback.md).

use crate::model::chat::Message;

pub use crate::train::data::{backward_prompt, AUGMENTED_TAG, SEED_TAG};

/// The self-curation prompt of the paper's Table 1, verbatim. The candidate pair follows it.
pub const RATING_PROMPT: &str = "Below is an instruction from an user and a candidate answer. Evaluate whether or not the answer is a good example of how AI Assistant should respond to the user's instruction. Please assign a score using the following 5-point scale:
1: It means the answer is incomplete, vague, off-topic, controversial, or not exactly what the user asked for. For example, some content seems missing, numbered list does not start from the beginning, the opening sentence repeats user's question. Or the response is from another person's perspective with their personal experience (e.g. taken from blog posts), or looks like an answer from a forum. Or it contains promotional text, navigation text, or other irrelevant information.
2: It means the answer addresses most of the asks from the user. It does not directly address the user's question. For example, it only provides a high-level methodology instead of the exact solution to user's question.
3: It means the answer is helpful but not written by an AI Assistant. It addresses all the basic asks from the user. It is complete and self contained with the drawback that the response is not written from an AI assistant's perspective, but from other people's perspective. The content looks like an excerpt from a blog post, web page, or web search results. For example, it contains personal experience or opinion, mentions comments section, or share on social media, etc.
4: It means the answer is written from an AI assistant's perspective with a clear focus of addressing the instruction. It provide a complete, clear, and comprehensive response to user's question or instruction without missing or irrelevant information. It is well organized, self-contained, and written in a helpful tone. It has minor room for improvement, e.g. more concise and focused.
5: It means it is a perfect answer from an AI Assistant. It has a clear focus on being a helpful AI Assistant, where the response looks like intentionally written to address the user's question or instruction without any irrelevant sentences. The answer provides high quality content, demonstrating expert knowledge in the area, is very well written, logical, easy-to-follow, engaging and insightful.

Please first provide a brief reasoning you used to derive the rating score, and then write \"Score: <rating>\" in the last line.";

/// The user message that asks the current model to rate `(instruction, output)`: the paper's
/// prompt with the pair appended. Everything before the pair is the same for every rating, so
/// the model server computes its KV once (prefix cache).
pub fn rating_prompt(instruction: &str, output: &str) -> String {
    format!(
        "{RATING_PROMPT}\n\n{}\n{}",
        instruction.trim(),
        output.trim()
    )
}

/// The conversation sent to the backward model M_yx for one passage: the same shape it was
/// trained on (`train::data::Record::to_messages` with `backward`).
pub fn augment_messages(passage: &str) -> Vec<Message> {
    vec![Message::user(backward_prompt(passage))]
}

/// The conversation sent to the forward model to rate one candidate. The system prompt is the
/// seed tag: the forward model was trained to answer "in the style of an AI Assistant" under it.
pub fn rating_messages(instruction: &str, output: &str) -> Vec<Message> {
    vec![
        Message::system(SEED_TAG),
        Message::user(rating_prompt(instruction, output)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rating_prompt_is_the_papers_with_the_pair_last() {
        let p = rating_prompt(" Explain X. ", "X is Y.\n");
        assert!(p.starts_with("Below is an instruction from an user and a candidate answer."));
        assert!(p.contains("write \"Score: <rating>\" in the last line.\n\nExplain X.\nX is Y."));
        assert!(p.ends_with("X is Y."));
        // Five scale lines, as in the paper's Table 1.
        assert_eq!(
            (1..=5)
                .filter(|n| p.contains(&format!("\n{n}: It means")))
                .count(),
            5
        );
    }

    #[test]
    fn every_rating_shares_the_same_prefix() {
        let a = rating_prompt("a", "b");
        let b = rating_prompt("completely different", "text");
        let common = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
        assert!(common >= RATING_PROMPT.len());
    }
}
