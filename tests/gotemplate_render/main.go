// Command gotemplate_render renders a template with Go's own text/template, the way Ollama does,
// so that tests/test_gotemplate_parity.py can compare conch.gotemplate with the real thing.
//
// Usage: gotemplate_render TEMPLATE_FILE DATA_JSON_FILE
//
// The template is parsed as Ollama parses a Modelfile TEMPLATE (template.New("").Option("missingkey=zero")).
// The JSON object becomes the data: top-level keys stay a map[string]any like the map Ollama passes
// (System, Messages, Tools, Response, Think, IsThinkSet, Prompt, ...), and "Messages" is decoded into
// []*Message, a struct with the fields of Ollama's api.Message, so that a field Ollama does not have is
// an error here as it is in Ollama. JSON numbers that are whole become int, as Go code would pass them.
// The rendering goes to stdout as raw bytes; any error goes to stderr with exit status 1.
// Standard library only: build with GO111MODULE=off, nothing is downloaded.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"text/template"
)

// Message mirrors the template-visible fields of github.com/ollama/ollama/api.Message.
type Message struct {
	Role       string
	Content    string
	Thinking   string
	Images     []string
	ToolCalls  []any
	ToolName   string
	ToolCallID string
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

// whole turns float64s that hold integers into int, recursively (json decodes every number as float64).
func whole(v any) any {
	switch x := v.(type) {
	case float64:
		if x == float64(int(x)) {
			return int(x)
		}
		return x
	case []any:
		for i := range x {
			x[i] = whole(x[i])
		}
		return x
	case map[string]any:
		for k := range x {
			x[k] = whole(x[k])
		}
		return x
	}
	return v
}

func main() {
	if len(os.Args) != 3 {
		fail("usage: gotemplate_render TEMPLATE_FILE DATA_JSON_FILE")
	}
	text, err := os.ReadFile(os.Args[1])
	if err != nil {
		fail("%v", err)
	}
	raw, err := os.ReadFile(os.Args[2])
	if err != nil {
		fail("%v", err)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		fail("data: %v", err)
	}
	data := map[string]any{}
	for key, value := range fields {
		if key == "Messages" {
			var messages []*Message
			if err := json.Unmarshal(value, &messages); err != nil {
				fail("data.Messages: %v", err)
			}
			data[key] = messages
			continue
		}
		var v any
		if err := json.Unmarshal(value, &v); err != nil {
			fail("data.%s: %v", key, err)
		}
		data[key] = whole(v)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Parse(string(text))
	if err != nil {
		fail("parse: %v", err)
	}
	var out bytes.Buffer
	if err := tmpl.Execute(&out, data); err != nil {
		fail("execute: %v", err)
	}
	os.Stdout.Write(out.Bytes())
}
