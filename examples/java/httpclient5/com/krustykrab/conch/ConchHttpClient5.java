package com.krustykrab.conch;

import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.UncheckedIOException;
import java.net.URI;
import java.net.URLEncoder;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.concurrent.atomic.AtomicInteger;
import org.apache.hc.client5.http.classic.methods.HttpGet;
import org.apache.hc.client5.http.classic.methods.HttpPost;
import org.apache.hc.client5.http.config.ConnectionConfig;
import org.apache.hc.client5.http.config.RequestConfig;
import org.apache.hc.client5.http.impl.classic.CloseableHttpClient;
import org.apache.hc.client5.http.impl.classic.HttpClients;
import org.apache.hc.client5.http.impl.io.PoolingHttpClientConnectionManagerBuilder;
import org.apache.hc.core5.http.ClassicHttpRequest;
import org.apache.hc.core5.http.ContentType;
import org.apache.hc.core5.http.Header;
import org.apache.hc.core5.http.HttpEntity;
import org.apache.hc.core5.http.io.entity.ByteArrayEntity;
import org.apache.hc.core5.http.io.entity.EntityUtils;
import org.apache.hc.core5.util.Timeout;

/**
 * The seeds' {@code ChatServiceImpl}, made right, on Apache HttpClient 5 ({@code httpclient5} 5.2.x, the
 * course pom's version) and Jackson, without Spring: the same calls, timeouts, retries and one-sentence
 * errors as {@link ConchClient} (RestTemplate), plus a connection pool and streaming through the same
 * client. Thread-safe: one instance serves every request of a service (a {@code @Service} in Spring
 * Boot, where it needs {@code org.apache.httpcomponents.client5:httpclient5} in the pom).
 *
 * <p>Transport failures (refused, timed out) come out as {@link UncheckedIOException}, the server's
 * refusals as {@link ConchApiException}.
 */
public class ConchHttpClient5 implements ConchCaller, AutoCloseable {
    private static final ObjectMapper JSON = new ObjectMapper();
    private final CloseableHttpClient http;
    private final ConchProperties props;
    private final AtomicInteger retries = new AtomicInteger();

    public ConchHttpClient5(ConchProperties props) {
        this.props = props;
        Timeout connect = Timeout.ofMilliseconds(props.connectTimeout.toMillis());
        Timeout read = Timeout.ofMilliseconds(props.readTimeout.toMillis());
        this.http = HttpClients.custom()
                .setConnectionManager(PoolingHttpClientConnectionManagerBuilder.create()
                        .setDefaultConnectionConfig(ConnectionConfig.custom()
                                .setConnectTimeout(connect)  // TCP connect
                                .setSocketTimeout(read)      // silence while waiting for the answer
                                .build())
                        .setMaxConnTotal(64).setMaxConnPerRoute(64)  // default 5 per route: few for a chat backend
                        .build())
                .setDefaultRequestConfig(RequestConfig.custom()
                        .setConnectionRequestTimeout(connect)        // a free pooled connection
                        .setResponseTimeout(read)
                        .build())
                .disableAutomaticRetries()  // we retry 503 ourselves, never a half-sent POST
                .build();
    }

    @Override
    public Answer generate(String prompt) {
        Double temperature = props.temperature;
        // URLEncoder: form encoding (space as '+', which the server decodes back to a space); the seeds'
        // String.format puts a raw '&' (cuts the prompt) or '+' (arrives as a space) in the URL
        URI uri = URI.create(props.baseUrl + "/generate?prompt=" + URLEncoder.encode(prompt, StandardCharsets.UTF_8)
                + "&max_new_tokens=" + props.maxTokens + (temperature == null ? "" : "&temperature=" + temperature));
        GenerateResponse r = call(() -> new HttpGet(uri), GenerateResponse.class);
        return new Answer(r.generatedText(), r.reasoning(), r.finishReason(), r.usage(), r.sources());
    }

    @Override
    public Answer chat(List<ChatMessage> history, String question) {
        ChatRequest body = new ChatRequest(props.model, ChatRequest.messages(props.systemPrompt, history, question),
                props.maxTokens, props.temperature, null, null);
        ChatResponse r = call(() -> post(body, "application/json"), ChatResponse.class);
        ChatResponse.Choice choice = r.choices().get(0);
        return new Answer(choice.message().content(), choice.message().reasoningContent(), choice.finishReason(),
                r.usage(), r.sources());
    }

    /**
     * Streams the next answer to {@code listener} through the same pooled client (the response timeout is
     * then the longest silence between two pieces). A 4xx/5xx before the stream starts is a
     * {@link ConchApiException} (a 503 is not retried here: a user who watches the page should see "busy"
     * at once), as are an error event and a stream that ends without {@code [DONE]}.
     */
    @Override
    public Answer stream(List<ChatMessage> history, String question, ConchStreamingClient.Listener listener)
            throws IOException {
        ChatRequest body = ChatRequest.streaming(props.model, ChatRequest.messages(props.systemPrompt, history, question),
                props.maxTokens, props.temperature);
        return http.execute(authorized(post(body, "text/event-stream")), response -> {
            HttpEntity entity = response.getEntity();
            if (response.getCode() != 200) {
                throw refusal(response.getCode(), response.getReasonPhrase(),
                        entity == null ? new byte[0] : EntityUtils.toByteArray(entity));
            }
            try (BufferedReader lines = new BufferedReader(new InputStreamReader(entity.getContent(),
                    StandardCharsets.UTF_8))) {  // UTF-8 whatever the locale or the headers say
                return ConchStreamingClient.read(lines.lines().iterator(), listener);
            }
        });
    }

    @Override
    public int retries() {
        return retries.get();
    }

    @Override
    public void close() throws IOException {
        http.close();
    }

    private ClassicHttpRequest authorized(ClassicHttpRequest request) {
        if (props.apiKey != null) {
            request.setHeader("Authorization", "Bearer " + props.apiKey);
        }
        return request;
    }

    private HttpPost post(ChatRequest body, String accept) throws IOException {
        HttpPost post = new HttpPost(props.baseUrl + "/v1/chat/completions");
        post.setHeader("Accept", accept);
        post.setEntity(new ByteArrayEntity(JSON.writeValueAsBytes(body), ContentType.APPLICATION_JSON));  // UTF-8
        return post;
    }

    private interface RequestMaker {
        ClassicHttpRequest make() throws IOException;
    }

    /** What came back: read whole inside the handler, so that the connection goes back to the pool. */
    private record Reply(int status, String reason, String retryAfter, byte[] body) {
    }

    /** Sends the request (made afresh for each attempt), retrying 503/429; a 2xx's JSON as {@code type}. */
    private <T> T call(RequestMaker maker, Class<T> type) {
        for (int attempt = 0; ; attempt++) {
            try {
                Reply reply = http.execute(authorized(maker.make()), response -> {
                    Header retryAfter = response.getFirstHeader("Retry-After");
                    HttpEntity entity = response.getEntity();
                    return new Reply(response.getCode(), response.getReasonPhrase(),
                            retryAfter == null ? null : retryAfter.getValue(),
                            entity == null ? new byte[0] : EntityUtils.toByteArray(entity));
                });
                if (reply.status() >= 200 && reply.status() < 300) {
                    return JSON.readValue(reply.body(), type);
                }
                if (!ConchRetry.busy(reply.status()) || attempt >= props.maxRetries) {
                    throw refusal(reply.status(), reply.reason(), reply.body());
                }
                retries.incrementAndGet();
                ConchRetry.sleep(ConchRetry.after(reply.retryAfter(), attempt));
            } catch (IOException e) {
                throw new UncheckedIOException(e);
            }
        }
    }

    private static ConchApiException refusal(int status, String reason, byte[] body) {
        String text = new String(body, StandardCharsets.UTF_8);  // UTF-8 whatever the headers say
        return new ConchApiException(status, ConchApiException.serverMessage(text, reason),
                ConchApiException.advice(status));
    }
}
