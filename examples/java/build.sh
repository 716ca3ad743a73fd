#!/usr/bin/env bash
# Compile both Java callers with javac and Debian's jars (Maven Central is not needed):
#   apt-get install default-jdk-headless libspring-web-java libjackson2-databind-java libcommons-logging-java \
#       libhttpclient5-java libhttpcore5-java
# (or `make examples`, as root). Writes
#   build/classes, build/classpath: the RestTemplate caller (src/; spring-web 4.3 here, the same source on Spring 6)
#   build/httpclient5/classes, build/httpclient5/classpath: the Apache HttpClient 5 caller (src/ without the
#       Spring files, plus httpclient5/)
# Run with
#   java -cp "build/classes:$(cat build/classpath)" com.krustykrab.conch.ConchCli generate "你是谁？"
#   java -cp "build/httpclient5/classes:$(cat build/httpclient5/classpath)" com.krustykrab.conch.ConchCli5 generate "你是谁？"
set -euo pipefail
cd "$(dirname "$0")"
JARS=/usr/share/java
JACKSON="jackson-databind jackson-core jackson-annotations"
# RestTemplate (spring-web 4.3, named spring3-* in Debian) and what it needs at run time
SPRING="spring3-web spring3-core spring3-beans spring3-context commons-logging"
# httpclient5 5.2.1 and what it needs: httpcore5 (+ its HTTP/2 half, which the builder links) and SLF4J (no-op logger)
HC5="httpclient5 httpcore5 httpcore5-h2 slf4j-api slf4j-nop"
# the files that import Spring: the rest is plain Java + Jackson, shared by both callers
SPRING_FILES="ConchClient.java ConchRestTemplates.java ConchCli.java"

classpath() {
    local cp="" jar
    for jar in "$@"; do
        if [ ! -f "$JARS/$jar.jar" ]; then
            echo "error: $JARS/$jar.jar is missing; install the JDK and the Debian packages with 'make examples' (as root)." >&2
            exit 1
        fi
        cp="$cp${cp:+:}$JARS/$jar.jar"
    done
    echo "$cp"
}
command -v javac >/dev/null || { echo "error: javac is missing; install default-jdk-headless ('make examples', as root)." >&2; exit 1; }
CP_REST=$(classpath $SPRING $JACKSON)
CP_HC5=$(classpath $HC5 $JACKSON)
JAVAC="javac -encoding UTF-8 -Xlint:all,-path,-serial,-processing -Werror"
SHARED=$(find src -name '*.java' $(for f in $SPRING_FILES; do printf -- "-not -name %s " "$f"; done))

rm -rf build && mkdir -p build/classes build/httpclient5/classes
$JAVAC -d build/classes -cp "$CP_REST" $(find src -name '*.java')
echo "$CP_REST" > build/classpath
$JAVAC -d build/httpclient5/classes -cp "$CP_HC5" $SHARED $(find httpclient5 -name '*.java')
echo "$CP_HC5" > build/httpclient5/classpath
echo "compiled $(find build/classes -name '*.class' | wc -l) classes into examples/java/build/classes (RestTemplate)" \
     "and $(find build/httpclient5/classes -name '*.class' | wc -l) into examples/java/build/httpclient5/classes (HttpClient 5)"
