package com.krustykrab.conch;

import com.fasterxml.jackson.annotation.JsonIgnoreProperties;
import com.fasterxml.jackson.annotation.JsonProperty;
import java.util.List;

/** The answer of GET /generate: the seeds' {@code generated_text}, plus what the server adds. */
@JsonIgnoreProperties(ignoreUnknown = true)
public record GenerateResponse(@JsonProperty("generated_text") String generatedText,
                               String reasoning,
                               @JsonProperty("finish_reason") String finishReason,
                               Usage usage,
                               List<Source> sources) {
}
