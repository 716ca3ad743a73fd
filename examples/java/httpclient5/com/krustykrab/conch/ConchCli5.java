package com.krustykrab.conch;

/**
 * Try the Apache HttpClient 5 caller from a terminal, with the same commands as {@code ConchCli}
 * (see {@link ConchCommands}):
 *
 * <pre>
 *   java -cp "build/httpclient5/classes:$(cat build/httpclient5/classpath)" com.krustykrab.conch.ConchCli5 generate "你是谁？"
 * </pre>
 */
public final class ConchCli5 {
    private ConchCli5() {
    }

    public static void main(String[] args) throws Exception {
        ConchCommands.run(args, ConchHttpClient5::new);
    }
}
