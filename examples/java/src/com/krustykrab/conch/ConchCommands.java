package com.krustykrab.conch;

import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.function.Function;

/**
 * The commands of {@code ConchCli} (RestTemplate) and {@code ConchCli5} (Apache HttpClient 5): what a Spring
 * Boot service would do in its controllers, with either caller.
 *
 * <pre>
 *   java -cp "build/classes:$(cat build/classpath)" com.krustykrab.conch.ConchCli generate "你是谁？"
 *   ... ConchCli chat "蟹堡王几点开门？" "周末呢？"     (a conversation: each question sees the answers before it)
 *   ... ConchCli stream "美味蟹堡怎么做？"             (the answer as it is generated)
 *   ... ConchCli burst 6 "Tell me about the sea."     (6 users at once; a busy server's 503s are retried)
 * </pre>
 *
 * A last argument {@code -} reads the questions from stdin (UTF-8, one a line) instead.
 * Settings come from -Dconch.* or CONCH_* (see {@link ConchProperties}). The last line printed is
 * a JSON summary (tests and notebooks read it); errors end in one sentence and exit code 2 (the
 * server refused) or 3 (the server could not be reached).
 */
public final class ConchCommands {
    private static final ObjectMapper JSON = new ObjectMapper();
    // System.out encodes with the platform charset (ASCII under LANG=C, before Java 18): Chinese would print as '?'
    private static final PrintStream OUT = new PrintStream(System.out, true, StandardCharsets.UTF_8);
    private static final PrintStream ERR = new PrintStream(System.err, true, StandardCharsets.UTF_8);

    private ConchCommands() {
    }

    /** Runs the command in {@code args} with the caller {@code callers} makes from the settings; exits on errors. */
    public static void run(String[] args, Function<ConchProperties, ConchCaller> callers) throws Exception {
        if (args.length < 2) {
            ERR.println("usage: ConchCli generate|chat|stream <question> [more questions]  |  ConchCli burst <n> <question>");
            System.exit(64);
        }
        ConchProperties props;
        try {
            props = ConchProperties.fromEnvironment();
        } catch (IllegalArgumentException e) {
            ERR.println("error: " + e.getMessage());
            System.exit(64);
            return;
        }
        if (args[args.length - 1].equals("-")) {
            // the questions from stdin, one a line, as UTF-8: a command line's arguments are decoded with
            // the locale's charset, which is ASCII under LANG=C (Docker images often have no locale)
            String[] lines = new String(System.in.readAllBytes(), StandardCharsets.UTF_8).strip().split("\\R");
            List<String> all = new ArrayList<>(List.of(args).subList(0, args.length - 1));
            all.addAll(List.of(lines));
            args = all.toArray(new String[0]);
        }
        try {
            Map<String, Object> summary = switch (args[0]) {
                case "generate" -> describe(callers.apply(props).generate(args[1]));
                case "chat" -> conversation(callers.apply(props), List.of(args).subList(1, args.length));
                case "stream" -> stream(callers.apply(props), args[1]);
                case "burst" -> burst(callers.apply(props), Integer.parseInt(args[1]), args[2]);
                default -> throw new IllegalArgumentException("unknown command '" + args[0]
                        + "'; use generate, chat, stream or burst.");
            };
            OUT.println(JSON.writeValueAsString(summary));
        } catch (ConchApiException e) {
            ERR.println("error: " + e.getMessage());
            System.exit(2);
        } catch (Exception e) {
            if (!unreachable(e)) {
                throw e;
            }
            ERR.println("error: could not reach the Magic Conch server at " + props.baseUrl + " (" + e.getMessage()
                    + "); is it running, and is conch.base-url / CONCH_BASE_URL right?");
            System.exit(3);
        }
    }

    /**
     * An I/O failure anywhere in the causes: refused, timed out, reset. RestTemplate wraps it in a
     * {@code ResourceAccessException}, the HttpClient 5 caller in an {@code UncheckedIOException}.
     */
    static boolean unreachable(Throwable e) {
        for (Throwable t = e; t != null; t = t.getCause()) {
            if (t instanceof java.io.IOException) {
                return true;
            }
        }
        return false;
    }

    static Map<String, Object> describe(Answer a) {
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("answer", a.content());
        m.put("reasoning", a.reasoning());
        m.put("finish_reason", a.finishReason());
        m.put("usage", a.usage());
        m.put("sources", a.sources());
        m.put("problem", a.problem());
        if (a.problem() != null) {
            ERR.println("note: " + a.problem());
        }
        return m;
    }

    static Map<String, Object> conversation(ConchCaller conch, List<String> questions) {
        List<ChatMessage> history = new ArrayList<>();
        List<Map<String, Object>> turns = new ArrayList<>();
        for (String q : questions) {
            Answer a = conch.chat(history, q);
            OUT.println("用户: " + q);
            OUT.println("海螺: " + a.content());
            history.add(ChatMessage.user(q));
            history.add(ChatMessage.assistant(a.content()));
            turns.add(describe(a));
        }
        return Map.of("turns", turns);
    }

    static Map<String, Object> stream(ConchCaller conch, String question) throws Exception {
        List<String> pieces = new ArrayList<>();
        List<String> thoughts = new ArrayList<>();
        Answer a = conch.stream(List.of(), question, new ConchStreamingClient.Listener() {
            @Override
            public void onReasoning(String piece) {
                thoughts.add(piece);
            }

            @Override
            public void onContent(String piece) {
                pieces.add(piece);
                OUT.print(piece);
                OUT.flush();
            }
        });
        OUT.println();
        Map<String, Object> m = describe(a);
        m.put("content_pieces", pieces.size());
        m.put("reasoning_pieces", thoughts.size());
        return m;
    }

    static Map<String, Object> burst(ConchCaller conch, int n, String question) throws Exception {
        // one caller, shared by all threads, as in a service
        ExecutorService pool = Executors.newFixedThreadPool(n);
        List<Future<Answer>> futures = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            futures.add(pool.submit(() -> conch.chat(List.of(), question)));
        }
        int answered = 0;
        List<String> errors = new ArrayList<>();
        for (Future<Answer> f : futures) {
            try {
                f.get();
                answered++;
            } catch (java.util.concurrent.ExecutionException e) {
                errors.add(e.getCause().getMessage());
            }
        }
        pool.shutdown();
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("requests", n);
        m.put("answered", answered);
        m.put("retries", conch.retries());
        m.put("errors", errors);
        return m;
    }
}
