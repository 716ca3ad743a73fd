package com.krustykrab.conch;

import com.fasterxml.jackson.annotation.JsonIgnoreProperties;
import com.fasterxml.jackson.annotation.JsonInclude;
import com.fasterxml.jackson.annotation.JsonProperty;

/**
 * One message of a conversation. In an answer, an R1 model's thinking arrives beside the content
 * as {@code reasoning_content} (DeepSeek's API does the same); send it back never: the history
 * holds only what was said. Unknown fields (the server may add some, e.g. {@code reasoning}) are
 * ignored instead of failing the whole call.
 */
@JsonIgnoreProperties(ignoreUnknown = true)
@JsonInclude(JsonInclude.Include.NON_NULL)
public record ChatMessage(String role, String content,
                          @JsonProperty("reasoning_content") String reasoningContent) {

    public static ChatMessage system(String content) {
        return new ChatMessage("system", content, null);
    }

    public static ChatMessage user(String content) {
        return new ChatMessage("user", content, null);
    }

    public static ChatMessage assistant(String content) {
        return new ChatMessage("assistant", content, null);
    }
}
