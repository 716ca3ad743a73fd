#!/usr/bin/env bash
# Compile the Java callers with javac and Debian's jars (Maven Central is not needed):
#   apt-get install default-jdk-headless libspring-web-java libjackson2-databind-java libhttpclient-java libcommons-logging-java
# Writes build/classes and build/classpath; run with
#   java -cp "build/classes:$(cat build/classpath)" com.krustykrab.conch.ConchCli generate "你是谁？"
set -euo pipefail
cd "$(dirname "$0")"
JARS=/usr/share/java
# RestTemplate (spring-web 4.3, named spring3-* in Debian) and what it needs, Jackson, Apache HttpClient 4.5
NEEDED="spring3-web spring3-core spring3-beans spring3-context jackson-databind jackson-core jackson-annotations
        httpclient httpcore commons-logging commons-codec"
CP=""
for jar in $NEEDED; do
    if [ ! -f "$JARS/$jar.jar" ]; then
        echo "error: $JARS/$jar.jar is missing; install the JDK and the Debian packages with 'make examples' (as root)." >&2
        exit 1
    fi
    CP="$CP${CP:+:}$JARS/$jar.jar"
done
command -v javac >/dev/null || { echo "error: javac is missing; install default-jdk-headless ('make examples', as root)." >&2; exit 1; }
rm -rf build && mkdir -p build/classes
javac -encoding UTF-8 -Xlint:all,-path,-serial,-processing -Werror -d build/classes -cp "$CP" $(find src -name '*.java')
echo "$CP" > build/classpath
echo "compiled $(find build/classes -name '*.class' | wc -l) classes into examples/java/build/classes"
