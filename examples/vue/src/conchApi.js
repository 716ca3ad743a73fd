// Talk to the Magic Conch server from a browser: POST /v1/chat/completions with "stream": true, read the
// server-sent events with fetch + ReadableStream (EventSource cannot POST nor send a header), and turn
// every failure into one sentence a user can act on. No Vue in here, so it works in any front end.

/** Split a growing text buffer into complete SSE events; returns [events' data strings, the rest]. */
export function takeEvents(buffer) {
  const events = []
  const blocks = buffer.replace(/\r\n?/g, '\n').split('\n\n')
  const rest = blocks.pop() // the last block may still be incomplete
  for (const block of blocks) {
    const data = block
      .split('\n')
      .filter((line) => line.startsWith('data:'))
      .map((line) => line.slice(5).replace(/^ /, ''))
      .join('\n')
    if (data) events.push(data)
  }
  return [events, rest]
}

/** One sentence for an HTTP error: what happened and what to do. */
export function describeHttpError(status, serverMessage, retryAfterS) {
  const said = serverMessage ? ` (server: ${serverMessage})` : ''
  if (status === 401) return `API key missing or wrong: enter the key the server was started with (--api_key).${said}`
  if (status === 429) return `Too many requests: wait ${retryAfterS ?? 'a few'} s and ask again.${said}`
  if (status === 503) return `The Magic Conch is busy (its queue is full): try again in ${retryAfterS ?? 'a few'} s.${said}`
  if (status === 504) return `The answer took longer than the server allows: ask a shorter question.${said}`
  if (status >= 400 && status < 500) return `The server refused the question (HTTP ${status})${said}.`
  return `The server failed (HTTP ${status})${said}.`
}

export class ConchError extends Error {
  constructor(message, { status = 0, retryAfterS = null, kind = 'error' } = {}) {
    super(message)
    this.status = status
    this.retryAfterS = retryAfterS
    this.kind = kind // 'http', 'stopped', 'cut', 'stream', 'network'
  }
}

/**
 * Stream one answer. `onEvent` receives {type: 'sources', sources} | {type: 'reasoning', text} |
 * {type: 'content', text} | {type: 'finish', reason}. Resolves when [DONE] arrives; rejects with a
 * ConchError otherwise (HTTP error, stopped by `signal`, stream cut before [DONE], error event).
 */
export async function streamChat({ baseUrl = '', apiKey = '', messages, maxTokens, temperature, signal, onEvent,
                                   fetchImpl = globalThis.fetch }) {
  const headers = { 'Content-Type': 'application/json', Accept: 'text/event-stream' }
  if (apiKey) headers.Authorization = `Bearer ${apiKey}`
  const body = { model: 'magic-conch', messages, stream: true }
  if (maxTokens) body.max_tokens = maxTokens
  if (temperature !== undefined && temperature !== null) body.temperature = temperature
  let response
  try {
    response = await fetchImpl(`${baseUrl.replace(/\/+$/, '')}/v1/chat/completions`, {
      method: 'POST', headers, body: JSON.stringify(body), signal,
    })
  } catch (e) {
    if (e.name === 'AbortError') throw new ConchError('Stopped.', { kind: 'stopped' })
    throw new ConchError(`Cannot reach the Magic Conch server at ${baseUrl || 'this site'}: is it running, and does ` +
      'it allow this page (--cors_origins)?', { kind: 'network' })
  }
  if (!response.ok) {
    let message = ''
    try {
      message = (await response.json())?.error?.message ?? ''
    } catch { /* not JSON */ }
    // cross-origin, Retry-After is readable only if the server lists it in Access-Control-Expose-Headers
    const header = response.headers.get('Retry-After')
    const retryAfterS = header && /^\d+$/.test(header) ? Number(header) : null
    throw new ConchError(describeHttpError(response.status, message, retryAfterS),
      { status: response.status, retryAfterS, kind: 'http' })
  }
  const reader = response.body.getReader()
  const decoder = new TextDecoder('utf-8') // stream: true below keeps a character split across chunks whole
  let buffer = ''
  try {
    for (;;) {
      const { value, done } = await reader.read()
      if (done) break
      let events
      ;[events, buffer] = takeEvents(buffer + decoder.decode(value, { stream: true }))
      for (const data of events) {
        if (data === '[DONE]') return
        const chunk = JSON.parse(data)
        if (chunk.error) throw new ConchError(`The server stopped the answer: ${chunk.error.message}`, { kind: 'stream' })
        if (chunk.sources) onEvent({ type: 'sources', sources: chunk.sources })
        for (const choice of chunk.choices ?? []) {
          const delta = choice.delta ?? {}
          const thought = delta.reasoning_content ?? delta.reasoning
          if (thought) onEvent({ type: 'reasoning', text: thought })
          if (delta.content) onEvent({ type: 'content', text: delta.content })
          if (choice.finish_reason) onEvent({ type: 'finish', reason: choice.finish_reason })
        }
      }
    }
  } catch (e) {
    if (e.name === 'AbortError') throw new ConchError('Stopped.', { kind: 'stopped' })
    if (e instanceof ConchError) throw e
    throw new ConchError(`The connection broke while the answer was streaming (${e.message}).`, { kind: 'cut' })
  }
  throw new ConchError('The answer was cut off: the stream ended before the server said it was done.', { kind: 'cut' })
}
