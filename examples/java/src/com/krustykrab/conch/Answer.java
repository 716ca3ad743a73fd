package com.krustykrab.conch;

import java.util.List;

/**
 * What the model answered: the text for the user, an R1 model's reasoning (may be empty), why it
 * stopped ("stop", or "length" when max_tokens ran out), the token counts and, in RAG mode, the
 * passages it was based on.
 */
public record Answer(String content, String reasoning, String finishReason, Usage usage, List<Source> sources) {

    /**
     * True when an R1 model was still thinking when it reached max_tokens: the answer is empty because
     * the whole budget went into the reasoning, not because the model had nothing to say.
     */
    public boolean cutOffWhileThinking() {
        return (content == null || content.isBlank()) && "length".equals(finishReason)
                && reasoning != null && !reasoning.isBlank();
    }

    /** One sentence for the caller when the answer is unusable, or null when it is fine. */
    public String problem() {
        if (cutOffWhileThinking()) {
            return "the answer is empty because the model used all " + (usage == null ? "its" : usage.completionTokens())
                    + " tokens for its reasoning before it began to answer; raise max_tokens (conch.max-tokens) "
                    + "or ask a shorter question.";
        }
        if (content == null || content.isBlank()) {
            return "the model returned an empty answer (finish_reason=" + finishReason + "); ask again or rephrase.";
        }
        return null;
    }
}
