// A Server-Sent Events parser, as the HTML standard defines it
// (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).
//
// EventSource cannot POST, so the playground reads the response body of a
// fetch() itself and feeds the decoded text to SSEParser.push() as it comes.
// Lines may end with CRLF, LF or CR, and a chunk may end anywhere: in a line,
// in a field name, between the CR and the LF of one line end.

/** One dispatched event: its type, its data (lines joined by "\n"), and the last event id. */
export class SSEEvent {
  constructor(type, data, id) {
    this.type = type;
    this.data = data;
    this.id = id;
  }
}

export class SSEParser {
  constructor() {
    this.buffer = "";        // text after the last complete line
    this.pendingCR = false;  // the previous chunk ended with CR: a LF next is that line's end
    this.data = [];          // data lines of the event being built
    this.type = "";
    this.lastEventId = "";   // outlives the event, as the standard says
    this.comments = 0;       // comment lines seen (": ping")
  }

  /** Feed decoded text; returns the events it completed, in order. */
  push(text) {
    if (this.pendingCR && text.startsWith("\n")) text = text.slice(1);
    this.pendingCR = false;
    this.buffer += text;
    const events = [];
    const lineEnd = /\r\n|\r|\n/g;
    let start = 0;
    let match;
    while ((match = lineEnd.exec(this.buffer)) !== null) {
      // A CR at the very end may be the first half of a CRLF: the line ends
      // here either way; remember to drop a LF that starts the next chunk.
      if (match[0] === "\r" && match.index === this.buffer.length - 1) this.pendingCR = true;
      const event = this.line(this.buffer.slice(start, match.index));
      if (event !== null) events.push(event);
      start = lineEnd.lastIndex;
    }
    this.buffer = this.buffer.slice(start);
    return events;
  }

  /** The stream ended: an event without its blank line is discarded (the standard's rule). */
  end() {
    this.buffer = "";
    this.data = [];
    this.type = "";
  }

  line(line) {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) {
      this.comments += 1;
      return null;
    }
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.type = value;
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    // "retry" and unknown fields: nothing to do for a fetch() reader.
    return null;
  }

  dispatch() {
    const event = this.data.length
      ? new SSEEvent(this.type || "message", this.data.join("\n"), this.lastEventId)
      : null;
    this.data = [];
    this.type = "";
    return event;
  }
}
