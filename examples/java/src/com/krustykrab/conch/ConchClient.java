package com.krustykrab.conch;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.net.URI;
import java.net.URLEncoder;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.time.ZonedDateTime;
import java.time.format.DateTimeFormatter;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.function.Supplier;
import org.springframework.http.HttpStatus;
import org.springframework.web.client.RestClientResponseException;
import org.springframework.web.client.RestTemplate;

/**
 * The seeds' {@code ChatServiceImpl}, made right. Thread-safe: one instance serves every request
 * of a Spring Boot service (make it a {@code @Service} with the RestTemplate injected).
 *
 * <ul>
 * <li>{@link #generate}: the seeds' {@code GET /generate?prompt=...}, with the prompt URL-encoded
 * (Chinese, {@code &}, {@code ?}, {@code #}, {@code +} arrive as typed);</li>
 * <li>{@link #chat}: {@code POST /v1/chat/completions} with the conversation so far and the Magic
 * Conch's system message; nothing to encode, and the history fits;</li>
 * <li>503 (queue full) and 429 are retried after the server's {@code Retry-After}, plus jitter;
 * other errors become a {@link ConchApiException} with the server's one-sentence reason.</li>
 * </ul>
 */
public class ConchClient {
    private static final ObjectMapper JSON = new ObjectMapper();
    private final RestTemplate rest;
    private final ConchProperties props;
    private final AtomicInteger retries = new AtomicInteger();

    public ConchClient(RestTemplate rest, ConchProperties props) {
        this.rest = rest;
        this.props = props;
    }

    public ConchClient(ConchProperties props) {
        this(ConchRestTemplates.create(props), props);
    }

    /** The seeds' call: one question in, the answer out ({@code generated_text}, reasoning split off). */
    public Answer generate(String prompt) {
        Double temperature = props.temperature;
        // URLEncoder: form encoding (space as '+', which the server decodes back to a space). A URI object,
        // not a String: RestTemplate encodes a String URL once more (%26 would arrive as the text "%26"),
        // and the seeds' String.format puts a raw '&' (cuts the prompt) or '+' (arrives as a space) in it
        URI uri = URI.create(props.baseUrl + "/generate?prompt=" + URLEncoder.encode(prompt, StandardCharsets.UTF_8)
                + "&max_new_tokens=" + props.maxTokens + (temperature == null ? "" : "&temperature=" + temperature));
        GenerateResponse r = withRetries(() -> rest.getForObject(uri, GenerateResponse.class));
        return new Answer(r.generatedText(), r.reasoning(), r.finishReason(), r.usage(), r.sources());
    }

    /** The next answer in a conversation: {@code history} is what was said so far (user, assistant, ...). */
    public Answer chat(List<ChatMessage> history, String question) {
        ChatRequest body = new ChatRequest(props.model, messages(props.systemPrompt, history, question), props.maxTokens,
                props.temperature, null, null);
        ChatResponse r = withRetries(() -> rest.postForObject(props.baseUrl + "/v1/chat/completions", body,
                ChatResponse.class));
        ChatResponse.Choice choice = r.choices().get(0);
        return new Answer(choice.message().content(), choice.message().reasoningContent(), choice.finishReason(),
                r.usage(), r.sources());
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

    /** How many times a 503/429 was retried by this client so far (for logs and metrics). */
    public int retries() {
        return retries.get();
    }

    private <T> T withRetries(Supplier<T> call) {
        for (int attempt = 0; ; attempt++) {
            try {
                return call.get();
            } catch (RestClientResponseException e) {
                int status = e.getRawStatusCode();
                boolean busy = status == HttpStatus.SERVICE_UNAVAILABLE.value() || status == 429;
                if (!busy || attempt >= props.maxRetries) {
                    throw new ConchApiException(status, serverMessage(e), ConchApiException.advice(status));
                }
                retries.incrementAndGet();
                sleep(retryAfter(e.getResponseHeaders() == null ? null
                        : e.getResponseHeaders().getFirst("Retry-After"), attempt));
            }
        }
    }

    /** Retry-After is seconds ("2") or an HTTP date; without it, 1 s, 2 s, 4 s, ...; plus up to 0.5 s of jitter. */
    static Duration retryAfter(String header, int attempt) {
        long millis = 1000L << Math.min(attempt, 5);
        if (header != null) {
            try {
                millis = Long.parseLong(header.trim()) * 1000;
            } catch (NumberFormatException notSeconds) {
                try {
                    millis = Duration.between(ZonedDateTime.now(),
                            ZonedDateTime.parse(header.trim(), DateTimeFormatter.RFC_1123_DATE_TIME)).toMillis();
                } catch (RuntimeException notADate) {
                    // keep the backoff
                }
            }
        }
        millis = Math.max(0, Math.min(millis, 30_000));  // never sleep a request thread for minutes
        return Duration.ofMillis(millis + ThreadLocalRandom.current().nextLong(500));
    }

    /** The server's one sentence from {"error": {"message": ...}}, read as UTF-8 whatever the headers say. */
    static String serverMessage(RestClientResponseException e) {
        String body = new String(e.getResponseBodyAsByteArray(), StandardCharsets.UTF_8);
        try {
            JsonNode message = JSON.readTree(body).path("error").path("message");
            if (message.isTextual()) {
                return message.asText();
            }
        } catch (java.io.IOException notJson) {
            // a proxy's HTML page, for instance
        }
        return body.isBlank() ? e.getStatusText() : body.substring(0, Math.min(body.length(), 200));
    }

    private static void sleep(Duration d) {
        try {
            Thread.sleep(d.toMillis());
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new IllegalStateException("interrupted while waiting to retry", e);
        }
    }
}
