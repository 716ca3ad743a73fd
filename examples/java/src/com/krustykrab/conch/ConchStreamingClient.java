package com.krustykrab.conch;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.util.Iterator;
import java.util.List;
import java.util.stream.Stream;

/**
 * The answer as it is generated: {@code POST /v1/chat/completions} with {@code "stream": true},
 * read line by line with the JDK's own {@code java.net.http.HttpClient} (no RestTemplate: it
 * buffers the whole body). Each server-sent event is one line {@code data: {json}}; the last is
 * {@code data: [DONE]}. A backend relays the pieces to the browser, for instance with Spring's
 * {@code SseEmitter}:
 *
 * <pre>{@code
 * @GetMapping(path = "/api/chat/stream", produces = MediaType.TEXT_EVENT_STREAM_VALUE)
 * public SseEmitter stream(@RequestParam String q) {
 *     SseEmitter emitter = new SseEmitter(180_000L);
 *     executor.execute(() -> {
 *         try {
 *             conch.stream(List.of(), q, new ConchStreamingClient.Listener() {
 *                 public void onContent(String piece) throws IOException { emitter.send(piece); }
 *             });
 *             emitter.complete();
 *         } catch (Exception e) { emitter.completeWithError(e); }
 *     });
 *     return emitter;
 * }
 * }</pre>
 */
public class ConchStreamingClient {
    private static final ObjectMapper JSON = new ObjectMapper();
    private final HttpClient http;
    private final ConchProperties props;

    /** What arrives while the answer streams; override what you need. */
    public interface Listener {
        /** RAG mode: the passages, before the first word of the answer. */
        default void onSources(List<Source> sources) throws IOException {
        }

        /** A piece of an R1 model's thinking (before the answer). */
        default void onReasoning(String piece) throws IOException {
        }

        /** A piece of the answer. */
        default void onContent(String piece) throws IOException {
        }
    }

    public ConchStreamingClient(ConchProperties props) {
        this.props = props;
        this.http = HttpClient.newBuilder().connectTimeout(props.connectTimeout).build();
    }

    /**
     * Streams the next answer of a conversation to {@code listener} and returns the whole of it.
     * A 4xx/5xx before the stream starts is a {@link ConchApiException} (a 503 is not retried here:
     * a user who watches the page should see "busy" at once); an error event in the stream, or a
     * stream that ends without {@code [DONE]}, is a {@link ConchApiException} too.
     */
    public Answer stream(List<ChatMessage> history, String question, Listener listener)
            throws IOException, InterruptedException {
        ChatRequest body = ChatRequest.streaming(props.model, ChatRequest.messages(props.systemPrompt, history, question),
                props.maxTokens, props.temperature);
        HttpRequest.Builder request = HttpRequest.newBuilder(URI.create(props.baseUrl + "/v1/chat/completions"))
                .timeout(props.readTimeout)  // until the response headers; the server's own timeout ends the stream
                .header("Content-Type", "application/json; charset=utf-8")
                .header("Accept", "text/event-stream")
                .POST(HttpRequest.BodyPublishers.ofByteArray(JSON.writeValueAsBytes(body)));
        if (props.apiKey != null) {
            request.header("Authorization", "Bearer " + props.apiKey);
        }
        HttpResponse<Stream<String>> response = http.send(request.build(),
                HttpResponse.BodyHandlers.ofLines());  // ofLines decodes UTF-8
        try (Stream<String> lines = response.body()) {
            if (response.statusCode() != 200) {
                String text = String.join("\n", (Iterable<String>) lines::iterator);
                throw new ConchApiException(response.statusCode(), ConchApiException.serverMessage(text, ""),
                        ConchApiException.advice(response.statusCode()));
            }
            return read(lines.iterator(), listener);
        }
    }

    /**
     * The answer from the stream's lines ({@code data: {json}} events up to {@code data: [DONE]}), each piece
     * passed to {@code listener} as it arrives; shared with the HttpClient 5 variant, which reads the same lines.
     */
    public static Answer read(Iterator<String> it, Listener listener) throws IOException {
        StringBuilder content = new StringBuilder();
        StringBuilder reasoning = new StringBuilder();
        String finishReason = null;
        List<Source> sources = null;
        Usage usage = null;
        boolean done = false;
        while (it.hasNext()) {
            String line = it.next();
            if (!line.startsWith("data:")) {
                continue;  // blank separator lines, comments (": ping"), event names
            }
            String data = line.substring(5).trim();
            if (data.equals("[DONE]")) {
                done = true;
                break;
            }
            JsonNode event = JSON.readTree(data);
            if (event.has("error")) {
                throw new ConchApiException(500, event.path("error").path("message").asText("error in the stream"),
                        "the server stopped this answer");
            }
            if (event.hasNonNull("sources")) {
                sources = List.of(JSON.treeToValue(event.get("sources"), Source[].class));
                listener.onSources(sources);
            }
            if (event.hasNonNull("usage")) {
                usage = JSON.treeToValue(event.get("usage"), Usage.class);
            }
            for (JsonNode choice : event.path("choices")) {
                JsonNode delta = choice.path("delta");
                String thought = text(delta, "reasoning_content");
                if (thought == null) {
                    thought = text(delta, "reasoning");  // the name newer servers (and vLLM) use
                }
                if (thought != null && !thought.isEmpty()) {
                    reasoning.append(thought);
                    listener.onReasoning(thought);
                }
                String piece = text(delta, "content");
                if (piece != null && !piece.isEmpty()) {
                    content.append(piece);
                    listener.onContent(piece);
                }
                if (choice.hasNonNull("finish_reason")) {
                    finishReason = choice.get("finish_reason").asText();
                }
            }
        }
        if (!done) {
            throw new ConchApiException(502, "the stream ended before [DONE] (the server stopped or the "
                    + "connection broke); the answer so far is incomplete", null);
        }
        return new Answer(content.toString(), reasoning.toString(), finishReason, usage, sources);
    }

    private static String text(JsonNode node, String field) {
        JsonNode value = node.get(field);
        return value == null || value.isNull() ? null : value.asText();
    }
}
