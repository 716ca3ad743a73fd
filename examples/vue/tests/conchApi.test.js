// node --test tests/ : the page's protocol code against canned server answers (no server, no browser)
import assert from 'node:assert/strict'
import { test } from 'node:test'
import { describeHttpError, streamChat, takeEvents } from '../src/conchApi.js'

const sse = (...events) => events.map((e) => `data: ${typeof e === 'string' ? e : JSON.stringify(e)}\n\n`).join('')

function fakeFetch(status, pieces, headers = {}) {
  return async () => {
    const bytes = pieces.map((p) => (typeof p === 'string' ? new TextEncoder().encode(p) : p))
    const body = new ReadableStream({
      start(controller) {
        for (const b of bytes) controller.enqueue(b)
        controller.close()
      },
    })
    return new Response(body, { status, headers })
  }
}

test('events split across chunks, CRLF and a Chinese character cut in half arrive whole', async () => {
  const text = sse({ choices: [{ delta: { role: 'assistant', content: '' } }], sources: [{ file: 'menu.md' }] },
    { choices: [{ delta: { reasoning_content: '想一想' } }] },
    { choices: [{ delta: { content: '美味蟹堡' } }] },
    { choices: [{ delta: {}, finish_reason: 'stop' }] }, '[DONE]').replace(/\n/g, '\r\n')
  const bytes = new TextEncoder().encode(text)
  const cut = new TextEncoder().encode(text.slice(0, text.indexOf('美'))).length + 1 // inside 美's 3 bytes
  const events = []
  await streamChat({ messages: [], onEvent: (e) => events.push(e),
    fetchImpl: fakeFetch(200, [bytes.slice(0, 7), bytes.slice(7, cut), bytes.slice(cut)]) })
  assert.deepEqual(events, [
    { type: 'sources', sources: [{ file: 'menu.md' }] },
    { type: 'reasoning', text: '想一想' },
    { type: 'content', text: '美味蟹堡' },
    { type: 'finish', reason: 'stop' },
  ])
})

test('a stream without [DONE] is reported as cut off, an error event as stopped by the server', async () => {
  await assert.rejects(streamChat({ messages: [], onEvent: () => {},
    fetchImpl: fakeFetch(200, [sse({ choices: [{ delta: { content: 'hi' } }] })]) }), { kind: 'cut' })
  await assert.rejects(streamChat({ messages: [], onEvent: () => {},
    fetchImpl: fakeFetch(200, [sse({ error: { message: 'the request took longer than its 3 s timeout.' } })]) }),
  { kind: 'stream', message: /3 s timeout/ })
})

test('401, 429 and 503 become one sentence with what to do, and Retry-After is kept', async () => {
  const busy = fakeFetch(503, [JSON.stringify({ error: { message: 'the server is busy' } })], { 'Retry-After': '2' })
  await assert.rejects(streamChat({ messages: [], onEvent: () => {}, fetchImpl: busy }),
    { status: 503, retryAfterS: 2, message: /^神奇海螺正忙.*2 秒后再试.*（服务器：the server is busy）$/ })
  assert.match(describeHttpError(401, 'missing or wrong API key'), /^API 密钥（API key）缺失或错误/)
  assert.match(describeHttpError(429, '', null), /请等 几 秒/)
})

test('in English (lang: "en") the same sentences, the server\'s words quoted as they are', async () => {
  const busy = fakeFetch(503, [JSON.stringify({ error: { message: 'the server is busy' } })], { 'Retry-After': '2' })
  await assert.rejects(streamChat({ messages: [], onEvent: () => {}, fetchImpl: busy, lang: 'en' }),
    { status: 503, retryAfterS: 2, message: /busy .*try again in 2 s.*\(server: the server is busy\)$/ })
  assert.match(describeHttpError(401, 'missing or wrong API key', null, 'en'), /^API key missing or wrong/)
  assert.match(describeHttpError(429, '', null, 'en'), /wait a few s/)
  await assert.rejects(streamChat({ messages: [], onEvent: () => {}, lang: 'en',
    fetchImpl: fakeFetch(200, [sse({ choices: [{ delta: { content: 'hi' } }] })]) }), { kind: 'cut', message: /cut off/ })
  await assert.rejects(streamChat({ messages: [], onEvent: () => {},
    fetchImpl: fakeFetch(200, [sse({ choices: [{ delta: { content: 'hi' } }] })]) }), { kind: 'cut', message: /被截断/ })
})

test('takeEvents keeps an incomplete event for the next chunk', () => {
  assert.deepEqual(takeEvents('data: 1\n\ndata: 2'), [['1'], 'data: 2'])
})
