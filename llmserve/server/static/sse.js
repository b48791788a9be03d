// Server-Sent Events read from a fetch() body. EventSource cannot POST or send an Authorization
// header, so the chat page reads the stream itself.

/** Yields the data of each event in `response`'s body (its `data:` lines joined by "\n"). */
export async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += value;
      // Lines end in \n or \r\n (the server's); a \r at the end of a read waits for its \n.
      const lines = pending.split("\n");
      pending = lines.pop();
      for (const raw of lines) {
        const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line[5] === " " ? 6 : 5));
        }
        // Other fields (event:, id:, retry:) and ":" comments (keep-alive pings) carry nothing here.
      }
    }
    if (data.length) yield data.join("\n");
  } finally {
    // A consumer that stops early (an error event) closes the connection, so the server stops
    // generating; on a finished or aborted stream this is a no-op whose rejection means nothing.
    reader.cancel().catch(() => {});
  }
}
