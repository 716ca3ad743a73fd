package com.krustykrab.conch;

import com.fasterxml.jackson.databind.ObjectMapper;
import java.nio.charset.StandardCharsets;
import java.util.List;
import org.springframework.http.client.SimpleClientHttpRequestFactory;
import org.springframework.http.converter.StringHttpMessageConverter;
import org.springframework.http.converter.json.MappingJackson2HttpMessageConverter;
import org.springframework.web.client.RestTemplate;

/**
 * The RestTemplate for the Magic Conch: the JDK's HttpURLConnection underneath with real timeouts,
 * UTF-8 text, and a strict Jackson mapper (unknown fields fail unless the class says
 * {@code @JsonIgnoreProperties(ignoreUnknown = true)}, as our DTOs do).
 *
 * <p>{@code SimpleClientHttpRequestFactory} and its {@code setConnectTimeout(int)} / {@code setReadTimeout(int)}
 * exist in Spring 4.3, 5 and 6 alike, so this compiles on Spring Boot 1, 2 and 3 with nothing but
 * {@code spring-web} (which {@code spring-boot-starter-web} brings) and Jackson. Spring 6's
 * {@code HttpComponentsClientHttpRequestFactory} takes Apache HttpClient 5 only, Spring 4.3/5's only
 * HttpClient 4: the same source could not serve both. For a connection pool use
 * {@code ConchHttpClient5} (examples/java/httpclient5/). In a Spring Boot service this method becomes
 * a {@code @Bean}.
 */
public final class ConchRestTemplates {
    private ConchRestTemplates() {
    }

    public static RestTemplate create(ConchProperties props) {
        SimpleClientHttpRequestFactory http = new SimpleClientHttpRequestFactory();
        http.setConnectTimeout((int) props.connectTimeout.toMillis());  // TCP connect
        http.setReadTimeout((int) props.readTimeout.toMillis());        // silence while waiting for the answer
        RestTemplate rest = new RestTemplate(http);
        // Spring 4.3's default StringHttpMessageConverter decodes text as ISO-8859-1: Chinese turns to mojibake
        rest.setMessageConverters(List.of(new StringHttpMessageConverter(StandardCharsets.UTF_8),
                new MappingJackson2HttpMessageConverter(new ObjectMapper())));
        if (props.apiKey != null) {
            rest.setInterceptors(List.of((request, body, execution) -> {
                request.getHeaders().set("Authorization", "Bearer " + props.apiKey);
                return execution.execute(request, body);
            }));
        }
        return rest;
    }
}
