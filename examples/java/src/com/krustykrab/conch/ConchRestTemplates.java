package com.krustykrab.conch;

import com.fasterxml.jackson.databind.ObjectMapper;
import java.nio.charset.StandardCharsets;
import java.util.List;
import org.apache.http.client.config.RequestConfig;
import org.apache.http.impl.client.CloseableHttpClient;
import org.apache.http.impl.client.HttpClients;
import org.springframework.http.client.HttpComponentsClientHttpRequestFactory;
import org.springframework.http.converter.StringHttpMessageConverter;
import org.springframework.http.converter.json.MappingJackson2HttpMessageConverter;
import org.springframework.web.client.RestTemplate;

/**
 * The RestTemplate for the Magic Conch: Apache HttpClient underneath (a connection pool, real
 * timeouts), UTF-8 text, and a strict Jackson mapper (unknown fields fail unless the class says
 * {@code @JsonIgnoreProperties(ignoreUnknown = true)}, as our DTOs do).
 *
 * <p>In a Spring Boot service this method becomes a {@code @Bean}. Spring 4.3/5 (and this example)
 * use httpclient 4.5; Spring 6 / Boot 3 use httpclient5 (the seeds' pom has 5.2.1), where the same
 * timeouts are set as {@code ConnectionConfig.custom().setConnectTimeout(...)} on the connection
 * manager and {@code RequestConfig.custom().setResponseTimeout(...)}, or simply
 * {@code RestTemplateBuilder.connectTimeout(...).readTimeout(...)}.
 */
public final class ConchRestTemplates {
    private ConchRestTemplates() {
    }

    public static RestTemplate create(ConchProperties props) {
        RequestConfig timeouts = RequestConfig.custom()
                .setConnectTimeout((int) props.connectTimeout.toMillis())           // TCP connect
                .setConnectionRequestTimeout((int) props.connectTimeout.toMillis()) // a free pooled connection
                .setSocketTimeout((int) props.readTimeout.toMillis())               // silence while waiting for the answer
                .build();
        CloseableHttpClient http = HttpClients.custom()
                .setDefaultRequestConfig(timeouts)
                .setMaxConnTotal(64).setMaxConnPerRoute(64)  // default is 2 per route: far too few for a chat backend
                .disableAutomaticRetries()                   // we retry 503 ourselves, never a half-sent POST
                .build();
        RestTemplate rest = new RestTemplate(new HttpComponentsClientHttpRequestFactory(http));
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
