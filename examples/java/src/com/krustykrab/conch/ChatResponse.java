package com.krustykrab.conch;

import com.fasterxml.jackson.annotation.JsonIgnoreProperties;
import com.fasterxml.jackson.annotation.JsonProperty;
import java.util.List;

/** The answer of POST /v1/chat/completions, only the fields we use. */
@JsonIgnoreProperties(ignoreUnknown = true)
public record ChatResponse(String id, List<Choice> choices, Usage usage, List<Source> sources) {

    @JsonIgnoreProperties(ignoreUnknown = true)
    public record Choice(int index, ChatMessage message, @JsonProperty("finish_reason") String finishReason) {
    }
}
