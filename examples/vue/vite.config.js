import vue from '@vitejs/plugin-vue'
import { defineConfig } from 'vite'

// `npm run dev`: the page on http://localhost:5173, and /v1 forwarded to the Magic Conch server, so the
// browser sees one origin (no CORS needed). CONCH_URL points elsewhere than http://127.0.0.1:8000.
export default defineConfig({
  plugins: [vue()],
  base: './', // dist/ works from any folder or static server
  server: {
    proxy: { '/v1': { target: process.env.CONCH_URL ?? 'http://127.0.0.1:8000', changeOrigin: true } },
  },
})
