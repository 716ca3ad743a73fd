package com.krustykrab.conch;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;

/**
 * The server refused the request: the HTTP status and the server's one-sentence reason
 * (its error shape is OpenAI's: {"error": {"message": ..., "type": ..., "code": ...}}).
 */
public class ConchApiException extends RuntimeException {
    private final int status;
    private final String serverMessage;

    public ConchApiException(int status, String serverMessage, String advice) {
        super("the Magic Conch server answered HTTP " + status + ": " + serverMessage
                + (advice == null ? "" : " (" + advice + ")"));
        this.status = status;
        this.serverMessage = serverMessage;
    }

    public int status() {
        return status;
    }

    public String serverMessage() {
        return serverMessage;
    }

    /** What the caller should do about a status, in a few words (null: nothing specific). */
    static String advice(int status) {
        return switch (status) {
            case 401 -> "check conch.api-key / CONCH_API_KEY: it must equal the server's --api_key";
            case 429, 503 -> "the server stayed busy through every retry; raise conch.max-retries or add capacity";
            case 504 -> "the answer took longer than the server's --request_timeout_s; ask for fewer max_tokens";
            default -> status >= 400 && status < 500 ? "the request is wrong; retrying will not help" : null;
        };
    }

    /** The server's one sentence from {"error": {"message": ...}}; else the start of the body, else {@code fallback}. */
    static String serverMessage(String body, String fallback) {
        try {
            JsonNode message = new ObjectMapper().readTree(body).path("error").path("message");
            if (message.isTextual()) {
                return message.asText();
            }
        } catch (IOException notJson) {
            // a proxy's HTML page, for instance
        }
        return body.isBlank() ? fallback : body.substring(0, Math.min(body.length(), 200));
    }
}
