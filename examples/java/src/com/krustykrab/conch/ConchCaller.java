package com.krustykrab.conch;

import java.io.IOException;
import java.util.List;

/**
 * What a backend asks of the Magic Conch, whichever HTTP client carries it: {@link ConchClient}
 * (Spring's RestTemplate) or {@code ConchHttpClient5} (Apache HttpClient 5, in {@code examples/java/httpclient5/}).
 * Both are thread-safe: one instance serves every request of a service.
 */
public interface ConchCaller {
    /** The seeds' call: one question in, the answer out ({@code GET /generate}, the prompt URL-encoded). */
    Answer generate(String prompt);

    /** The next answer in a conversation: {@code history} is what was said so far (user, assistant, ...). */
    Answer chat(List<ChatMessage> history, String question);

    /** The next answer as it is generated, each piece to {@code listener}; returns the whole of it. */
    Answer stream(List<ChatMessage> history, String question, ConchStreamingClient.Listener listener)
            throws IOException, InterruptedException;

    /** How many times a 503/429 was retried by this caller so far (for logs and metrics). */
    int retries();
}
