package com.krustykrab.conch;

import java.time.Duration;

/**
 * Where the Magic Conch server is and how to call it: read from configuration, never from code.
 *
 * <p>Each setting comes from a system property ({@code -Dconch.api-key=...}), else an environment
 * variable ({@code CONCH_API_KEY}), else the default. In a Spring Boot service, turn this class into
 * a {@code @ConfigurationProperties("conch")} bean and put the same names in {@code application.yml}
 * ({@code conch.base-url}, {@code conch.api-key: ${CONCH_API_KEY}}, ...).
 */
public final class ConchProperties {
    /** e.g. http://127.0.0.1:8000 (the server's --host/--port) */
    public final String baseUrl;
    /** the server's --api_key, or null when it runs without one */
    public final String apiKey;
    /** how long to wait for a TCP connection: short, an unreachable server should fail fast */
    public final Duration connectTimeout;
    /**
     * how long to wait for the answer: LONGER than the server's --request_timeout_s (120 s by
     * default), so the server's own 504 with its one-sentence reason arrives before we give up
     */
    public final Duration readTimeout;
    /** how often a 503 (queue full) or 429 is retried, each time after the server's Retry-After */
    public final int maxRetries;
    /** the served model name (the server's --served_model_name) */
    public final String model;
    /** the Magic Conch's system behaviour, sent as the first message (empty: none) */
    public final String systemPrompt;
    /** the answer budget; an R1 model's reasoning counts against it too */
    public final int maxTokens;
    /** sampling temperature; 0: the same answer every time; null: the server's default (0.6) */
    public final Double temperature;

    public static final String DEFAULT_SYSTEM_PROMPT = "你是神奇海螺（Magic Conch），蟹堡王（Krusty Krab）的智能助手。";

    public ConchProperties(String baseUrl, String apiKey, Duration connectTimeout, Duration readTimeout,
                           int maxRetries, String model, String systemPrompt, int maxTokens, Double temperature) {
        if (baseUrl == null || !(baseUrl.startsWith("http://") || baseUrl.startsWith("https://"))) {
            throw new IllegalArgumentException("conch.base-url must start with http:// or https://, got '"
                    + baseUrl + "'; set -Dconch.base-url or CONCH_BASE_URL, e.g. http://127.0.0.1:8000.");
        }
        this.baseUrl = baseUrl.replaceAll("/+$", "");
        this.apiKey = apiKey == null || apiKey.isBlank() ? null : apiKey.trim();
        this.connectTimeout = connectTimeout;
        this.readTimeout = readTimeout;
        this.maxRetries = maxRetries;
        this.model = model;
        this.systemPrompt = systemPrompt;
        this.maxTokens = maxTokens;
        this.temperature = temperature;
    }

    /** Settings from system properties and environment variables (see the class comment). */
    public static ConchProperties fromEnvironment() {
        return new ConchProperties(
                setting("conch.base-url", "http://127.0.0.1:8000"),
                setting("conch.api-key", null),
                Duration.ofSeconds(number("conch.connect-timeout-s", 5)),
                Duration.ofSeconds(number("conch.read-timeout-s", 130)),  // server default 120 s + margin
                number("conch.max-retries", 3),
                setting("conch.model", "magic-conch"),
                setting("conch.system-prompt", DEFAULT_SYSTEM_PROMPT),
                number("conch.max-tokens", 512),
                decimal("conch.temperature"));
    }

    /** {@code conch.api-key} is read from -Dconch.api-key, else from CONCH_API_KEY. */
    static String setting(String name, String fallback) {
        String value = System.getProperty(name);
        if (value == null) {
            value = System.getenv(name.toUpperCase().replace('.', '_').replace('-', '_'));
        }
        return value != null ? value : fallback;
    }

    static Double decimal(String name) {
        String value = setting(name, null);
        try {
            return value == null || value.isBlank() ? null : Double.valueOf(value.trim());
        } catch (NumberFormatException e) {
            throw new IllegalArgumentException(name + " must be a number such as 0.6, got '" + value + "'.");
        }
    }

    static int number(String name, int fallback) {
        String value = setting(name, null);
        if (value == null) {
            return fallback;
        }
        try {
            return Integer.parseInt(value.trim());
        } catch (NumberFormatException e) {
            throw new IllegalArgumentException(name + " must be a whole number, got '" + value + "'.");
        }
    }
}
