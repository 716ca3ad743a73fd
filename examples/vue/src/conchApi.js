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

// The sentences this file writes, in Chinese (the default) and English; what the server says is quoted as it is.
export const MESSAGES = {
  zh: {
    server: (m) => `（服务器：${m}）`,
    401: (said) => `API 密钥（API key）缺失或错误：请填写服务器启动时设置的密钥（--api_key）。${said}`,
    429: (wait, said) => `请求太多：请等 ${wait ?? '几'} 秒再问。${said}`,
    503: (wait, said) => `神奇海螺正忙（队列已满）：请 ${wait ?? '几'} 秒后再试。${said}`,
    504: (said) => `回答超过了服务器允许的时间：请换个简短的问题。${said}`,
    refused: (status, said) => `服务器拒绝了这个问题（HTTP ${status}）${said}。`,
    failed: (status, said) => `服务器出错了（HTTP ${status}）${said}。`,
    stopped: '已停止（Stopped）。',
    unreachable: (where) => `连不上 ${where} 的神奇海螺服务器：它在运行吗？它允许这个页面访问吗（--cors_origins）？`,
    thisSite: '本站',
    serverStopped: (m) => `服务器中止了回答：${m}`,
    broke: (m) => `回答传输到一半时连接断了（${m}）。`,
    cut: '回答被截断了：服务器还没说完，数据流就结束了。',
  },
  en: {
    server: (m) => ` (server: ${m})`,
    401: (said) => `API key missing or wrong: enter the key the server was started with (--api_key).${said}`,
    429: (wait, said) => `Too many requests: wait ${wait ?? 'a few'} s and ask again.${said}`,
    503: (wait, said) => `The Magic Conch is busy (its queue is full): try again in ${wait ?? 'a few'} s.${said}`,
    504: (said) => `The answer took longer than the server allows: ask a shorter question.${said}`,
    refused: (status, said) => `The server refused the question (HTTP ${status})${said}.`,
    failed: (status, said) => `The server failed (HTTP ${status})${said}.`,
    stopped: 'Stopped.',
    unreachable: (where) => `Cannot reach the Magic Conch server at ${where}: is it running, and does it allow this ` +
      'page (--cors_origins)?',
    thisSite: 'this site',
    serverStopped: (m) => `The server stopped the answer: ${m}`,
    broke: (m) => `The connection broke while the answer was streaming (${m}).`,
    cut: 'The answer was cut off: the stream ended before the server said it was done.',
  },
}

const text = (lang) => MESSAGES[lang] ?? MESSAGES.zh

/** One sentence for an HTTP error: what happened and what to do ('zh' or 'en'). */
export function describeHttpError(status, serverMessage, retryAfterS, lang = 'zh') {
  const t = text(lang)
  const said = serverMessage ? t.server(serverMessage) : ''
  if (status === 401) return t[401](said)
  if (status === 429) return t[429](retryAfterS, said)
  if (status === 503) return t[503](retryAfterS, said)
  if (status === 504) return t[504](said)
  if (status >= 400 && status < 500) return t.refused(status, said)
  return t.failed(status, said)
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
 * ConchError otherwise (HTTP error, stopped by `signal`, stream cut before [DONE], error event), whose message
 * is one sentence in `lang` ('zh' or 'en').
 */
export async function streamChat({ baseUrl = '', apiKey = '', messages, maxTokens, temperature, signal, onEvent,
                                   lang = 'zh', fetchImpl = globalThis.fetch }) {
  const t = text(lang)
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
    if (e.name === 'AbortError') throw new ConchError(t.stopped, { kind: 'stopped' })
    throw new ConchError(t.unreachable(baseUrl || t.thisSite), { kind: 'network' })
  }
  if (!response.ok) {
    let message = ''
    try {
      message = (await response.json())?.error?.message ?? ''
    } catch { /* not JSON */ }
    // cross-origin, Retry-After is readable only if the server lists it in Access-Control-Expose-Headers
    const header = response.headers.get('Retry-After')
    const retryAfterS = header && /^\d+$/.test(header) ? Number(header) : null
    throw new ConchError(describeHttpError(response.status, message, retryAfterS, lang),
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
        if (chunk.error) throw new ConchError(t.serverStopped(chunk.error.message), { kind: 'stream' })
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
    if (e.name === 'AbortError') throw new ConchError(t.stopped, { kind: 'stopped' })
    if (e instanceof ConchError) throw e
    throw new ConchError(t.broke(e.message), { kind: 'cut' })
  }
  throw new ConchError(t.cut, { kind: 'cut' })
}
