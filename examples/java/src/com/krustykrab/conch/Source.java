package com.krustykrab.conch;

import com.fasterxml.jackson.annotation.JsonIgnoreProperties;
import com.fasterxml.jackson.annotation.JsonProperty;

/** RAG mode (server started with --rag_dir): a passage the answer was based on. */
@JsonIgnoreProperties(ignoreUnknown = true)
public record Source(String file, String heading, @JsonProperty("chunk_id") String chunkId,
                     double score, String text) {
}
