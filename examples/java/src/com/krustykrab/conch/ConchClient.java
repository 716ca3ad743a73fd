package com.krustykrab.conch;

import java.io.IOException;
import java.net.URI;
import java.net.URLEncoder;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.function.Supplier;
import org.springframework.http.HttpHeaders;
import org.springframework.web.client.HttpStatusCodeException;
import org.springframework.web.client.RestTemplate;

/**
 * The seeds' {@code ChatServiceImpl}, made right, on Spring's RestTemplate. Thread-safe: one instance
 * serves every request of a Spring Boot service (make it a {@code @Service} with the RestTemplate injected).
 * It compiles and behaves the same on Spring 4.3 / 5 and on Spring 6 (Boot 3): every Spring API it uses
 * exists, undeprecated, in both.
 *
 * <ul>
 * <li>{@link #generate}: the seeds' {@code GET /generate?prompt=...}, with the prompt URL-encoded
 * (Chinese, {@code &}, {@code ?}, {@code #}, {@code +} arrive as typed);</li>
 * <li>{@link #chat}: {@code POST /v1/chat/completions} with the conversation so far and the Magic
 * Conch's system message; nothing to encode, and the history fits;</li>
 * <li>{@link #stream}: the same, as it is generated ({@link ConchStreamingClient}: RestTemplate buffers
 * the whole body);</li>
 * <li>503 (queue full) and 429 are retried after the server's {@code Retry-After}, plus jitter;
 * other errors become a {@link ConchApiException} with the server's one-sentence reason.</li>
 * </ul>
 */
public class ConchClient implements ConchCaller {
    private final RestTemplate rest;
    private final ConchProperties props;
    private final ConchStreamingClient streaming;
    private final AtomicInteger retries = new AtomicInteger();

    public ConchClient(RestTemplate rest, ConchProperties props) {
        this.rest = rest;
        this.props = props;
        this.streaming = new ConchStreamingClient(props);
    }

    public ConchClient(ConchProperties props) {
        this(ConchRestTemplates.create(props), props);
    }

    @Override
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

    @Override
    public Answer chat(List<ChatMessage> history, String question) {
        ChatRequest body = new ChatRequest(props.model, ChatRequest.messages(props.systemPrompt, history, question),
                props.maxTokens, props.temperature, null, null);
        ChatResponse r = withRetries(() -> rest.postForObject(props.baseUrl + "/v1/chat/completions", body,
                ChatResponse.class));
        ChatResponse.Choice choice = r.choices().get(0);
        return new Answer(choice.message().content(), choice.message().reasoningContent(), choice.finishReason(),
                r.usage(), r.sources());
    }

    @Override
    public Answer stream(List<ChatMessage> history, String question, ConchStreamingClient.Listener listener)
            throws IOException, InterruptedException {
        return streaming.stream(history, question, listener);
    }

    /** The request's messages: the system behaviour, the history (without its reasoning) and the question. */
    public static List<ChatMessage> messages(String systemPrompt, List<ChatMessage> history, String question) {
        return ChatRequest.messages(systemPrompt, history, question);
    }

    @Override
    public int retries() {
        return retries.get();
    }

    private <T> T withRetries(Supplier<T> call) {
        for (int attempt = 0; ; attempt++) {
            try {
                return call.get();
            } catch (HttpStatusCodeException e) {
                // getStatusCode().value(): HttpStatus in Spring 4.3/5, HttpStatusCode in 6; both have value()
                // (getRawStatusCode() is deprecated in Spring 6). A status Spring does not know, such as 599,
                // is an UnknownHttpStatusCodeException and goes up as it is
                int status = e.getStatusCode().value();
                if (!ConchRetry.busy(status) || attempt >= props.maxRetries) {
                    // Spring 6.1+ streams a POST's body through HttpURLConnection, which then cannot read a 401's
                    // body (HttpRetryException, which Spring swallows): that sentence is the status text
                    // "Unauthorized" instead of the server's, and the advice still names the key
                    String body = new String(e.getResponseBodyAsByteArray(), StandardCharsets.UTF_8);
                    throw new ConchApiException(status, ConchApiException.serverMessage(body, e.getStatusText()),
                            ConchApiException.advice(status));
                }
                retries.incrementAndGet();
                HttpHeaders headers = e.getResponseHeaders();
                ConchRetry.sleep(ConchRetry.after(headers == null ? null : headers.getFirst("Retry-After"), attempt));
            }
        }
    }
}
