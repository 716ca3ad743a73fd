package com.krustykrab.conch;

/**
 * Try the RestTemplate caller from a terminal (see {@link ConchCommands} for the commands):
 *
 * <pre>
 *   java -cp "build/classes:$(cat build/classpath)" com.krustykrab.conch.ConchCli generate "你是谁？"
 * </pre>
 */
public final class ConchCli {
    private ConchCli() {
    }

    public static void main(String[] args) throws Exception {
        ConchCommands.run(args, ConchClient::new);
    }
}
