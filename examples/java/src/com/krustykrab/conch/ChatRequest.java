package com.krustykrab.conch;

import com.fasterxml.jackson.annotation.JsonInclude;
import com.fasterxml.jackson.annotation.JsonProperty;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;

/** The body of POST /v1/chat/completions (OpenAI's shape, only the fields we use; nulls are left out). */
@JsonInclude(JsonInclude.Include.NON_NULL)
public record ChatRequest(String model, List<ChatMessage> messages,
                          @JsonProperty("max_tokens") Integer maxTokens,
                          Double temperature, Boolean stream,
                          @JsonProperty("stream_options") Map<String, Object> streamOptions) {

    /** A streaming request that also asks for the token counts in a last chunk. */
    public static ChatRequest streaming(String model, List<ChatMessage> messages, Integer maxTokens,
                                        Double temperature) {
        return new ChatRequest(model, messages, maxTokens, temperature, true, Map.of("include_usage", true));
    }

    /** The request's messages: the system behaviour, the history (without its reasoning) and the question. */
    public static List<ChatMessage> messages(String systemPrompt, List<ChatMessage> history, String question) {
        List<ChatMessage> messages = new ArrayList<>();
        if (systemPrompt != null && !systemPrompt.isBlank()) {
            messages.add(ChatMessage.system(systemPrompt));
        }
        for (ChatMessage m : history) {
            messages.add(new ChatMessage(m.role(), m.content(), null));
        }
        messages.add(ChatMessage.user(question));
        return messages;
    }
}
