// How an app uses the library, type-checked against hotpath.d.ts (`tsc --noEmit --strict`, run
// by cli/tests/webclient.rs): a declaration that stops describing the module breaks the build,
// and the `@ts-expect-error` lines prove the types refuse what the gateway refuses.
import {
  HotpathClient,
  HotpathError,
  MESSAGE_STATES,
  backoffDelay,
  newClientMessageId,
  type ClientEvents,
  type Conversation,
  type HistoryMessage,
  type MessageState,
  type SendAck,
} from "../hotpath.js";

export async function usage(baseUrl: string, token: () => Promise<string>): Promise<void> {
  const client = new HotpathClient({ baseUrl, token, autoDelivered: true, reconnectBaseMs: 250 });
  const off = client.on("connection", ({ state, delayMs, attempt }) => {
    const waiting: number | undefined = delayMs;
    console.log(state, waiting, attempt);
  });
  off();
  client.on("message", ({ message, own }) => {
    const seq: number = message.seq;
    const from: string = message.senderId;
    console.log(seq, from, own);
  });
  client.on("state", (event: ClientEvents["state"]) => {
    const state: MessageState | "rejected" = event.state;
    console.log(event.clientMessageId, state, event.seq, event.reason?.code);
  });
  client.on("synced", ({ conversationId, lastSeq }) => console.log(conversationId, lastSeq));
  await client.connect();

  const created: Conversation = await client.createConversation({ type: "group", members: ["bob"] });
  const listed: Conversation[] = await client.listConversations();
  const lastSeq: number = listed[0]?.lastSeq ?? 0;
  client.track(created.conversationId, lastSeq);
  try {
    const ack: SendAck = await client.send({
      conversationId: created.conversationId,
      content: "hello",
      clientMessageId: newClientMessageId(),
    });
    const again: boolean = ack.idempotentHit;
    console.log(ack.messageId, again);
    await client.ack(ack.messageId, "read");
  } catch (error) {
    if (error instanceof HotpathError) {
      const wait: number | undefined = error.retryAfterSeconds;
      console.log(error.status, error.code, wait, error.retryable);
    }
  }
  const older: HistoryMessage[] = await client.historyBefore(created.conversationId, 40, 30);
  const page = await client.history(created.conversationId, { afterSeq: 0, limit: 10 });
  const next: number = page.nextAfterSeq;
  const status = await client.status(older[0]?.messageId ?? "");
  console.log(next, status.state, status.recipients?.length, MESSAGE_STATES.length, backoffDelay(3));
  client.watch("m", created.conversationId, "sent", 1);
  client.close();

  // @ts-expect-error receipts are "delivered" or "read", never "sent"
  await client.ack("m", "sent");
  // @ts-expect-error a send names its conversation
  await client.send({ content: "nowhere" });
  // @ts-expect-error there is no such event
  client.on("typing", () => {});
  // @ts-expect-error the token is required
  new HotpathClient({ baseUrl });
}
