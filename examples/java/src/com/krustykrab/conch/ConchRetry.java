package com.krustykrab.conch;

import java.time.Duration;
import java.time.ZonedDateTime;
import java.time.format.DateTimeFormatter;
import java.util.concurrent.ThreadLocalRandom;

/** When to try again: a 503 (queue full) or 429 is retried after the server's {@code Retry-After}, plus jitter. */
final class ConchRetry {
    private ConchRetry() {
    }

    /** 503 and 429 mean "busy, come back later"; every other error would be refused again. */
    static boolean busy(int status) {
        return status == 503 || status == 429;
    }

    /** Retry-After is seconds ("2") or an HTTP date; without it, 1 s, 2 s, 4 s, ...; plus up to 0.5 s of jitter. */
    static Duration after(String header, int attempt) {
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

    static void sleep(Duration d) {
        try {
            Thread.sleep(d.toMillis());
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new IllegalStateException("interrupted while waiting to retry", e);
        }
    }
}
