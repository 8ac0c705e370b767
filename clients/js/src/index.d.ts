// Hand-written types for @fluxbase/client (src/index.js).

export type Json = null | boolean | number | string | Json[] | { [k: string]: Json };
export type Param = Json | bigint | Date | Uint8Array | ArrayBuffer;
export type Row = Record<string, any>;

export class FluxbaseError extends Error {
  readonly status: number;
  readonly code: string;
  readonly details: string | null;
  readonly statementIndex: number | null;
  readonly retryAfter: number | null;
  readonly body: unknown;
}
export class SqlError extends FluxbaseError {
  readonly sqlstate: string | null;
}
export class WebhookVerificationError extends Error {}

export interface SqlResult<R = Row> {
  rows: R[];
  columns: string[];
  rowCount: number;
  message: string | null;
  truncated: boolean;
  executionInfo: { time?: string; timeMs?: number; rowCount?: number; operation?: string; [k: string]: unknown };
}
export type Statement = string | [string, Param[]] | { query: string; params?: Param[] };

export interface ClientOptions {
  url: string;
  projectId: string;
  apiKey?: string | null;
  realtimeUrl?: string | null;
  fetch?: typeof fetch;
  WebSocket?: any;
  maxRetries?: number;
  refreshMarginMs?: number;
  /** Persist the end user's session (e.g. localStorage): shared by tabs, refreshed once. */
  storage?: { getItem(k: string): string | null; setItem(k: string, v: string): void; removeItem(k: string): void } | null;
  storageKey?: string;
}

export interface Session { accessToken: string; refreshToken: string; expiresAt: number; user: Row | null }
export type AuthEvent = 'SIGNED_IN' | 'TOKEN_REFRESHED' | 'SIGNED_OUT';

export interface Auth {
  readonly session: Session | null;
  readonly user: Row | null;
  register(email: string, password: string, displayName?: string): Promise<Row>;
  login(email: string, password: string): Promise<Session>;
  setSession(session: Session): Session;
  refresh(opts?: { force?: boolean }): Promise<Session>;
  accessToken(): Promise<string | null>;
  me(): Promise<Row>;
  logout(): Promise<void>;
  onAuthStateChange(cb: (event: AuthEvent, session: Session | null) => void): () => void;
}

export type Progress = (sent: number, total: number) => void;
export interface StoredFile { id: string; name: string; s3_key: string; size: number; bucketId: string; contentType: string; [k: string]: unknown }
export interface Storage {
  listBuckets(): Promise<Row[]>;
  createBucket(name: string, opts?: { isPublic?: boolean; [k: string]: unknown }): Promise<Row>;
  deleteBucket(bucket: string): Promise<Row>;
  upload(bucket: string, data: Blob | Uint8Array | string, opts?: { name?: string; contentType?: string; onProgress?: Progress }): Promise<StoredFile>;
  uploadDirect(bucket: string, data: Blob | Uint8Array | string, opts?: { name?: string; contentType?: string; onProgress?: Progress }): Promise<StoredFile>;
  list(bucket: string, opts?: { prefix?: string; limit?: number; cursor?: string }): Promise<{ files: StoredFile[]; nextCursor: string | null }>;
  downloadUrl(s3Key: string, opts?: { expiresIn?: number }): Promise<string>;
  remove(...s3Keys: (string | string[])[]): Promise<{ deleted: string[]; notFound: string[] }>;
}

export class Query<R = Row> {
  eq(column: string, value: Param): this;
  neq(column: string, value: Param): this;
  gt(column: string, value: Param): this;
  gte(column: string, value: Param): this;
  lt(column: string, value: Param): this;
  lte(column: string, value: Param): this;
  in(column: string, values: Iterable<Param>): this;
  like(column: string, pattern: string): this;
  ilike(column: string, pattern: string): this;
  isNull(column: string, isNull?: boolean): this;
  where(filter: Record<string, unknown>): this;
  order(column: string, opts?: { desc?: boolean }): this;
  select(...fields: (string | string[])[]): this;
  limit(n: number): this;
  offset(n: number): this;
  range(from: number, to: number): this;
  page(): Promise<{ records: R[]; count: number; limit: number; offset: number; hasMore: boolean }>;
  get(): Promise<R[]>;
  all(pageSize?: number): AsyncGenerator<R>;
  getOne(key: string | number): Promise<R>;
  insert(values: Row | Row[]): Promise<R[]>;
  update(key: string | number, values: Row): Promise<R>;
  delete(key: string | number): Promise<unknown>;
}

export interface DbEvent { type: 'db_event'; id: number; cursor: string; roomId: string; timestamp: string;
  payload: { operation: 'INSERT' | 'UPDATE' | 'DELETE'; table: string; record: Row | null; old: Row | null } }
export interface SchemaEvent { type: 'schema_update'; id: number; cursor: string; roomId: string; timestamp: string; payload: Row }
export interface BroadcastEvent { type: 'broadcast'; id: number; cursor: string; roomId: string; timestamp: string; event: string; payload: Json }
export interface ResyncRequired { type: 'resync_required'; roomId: string; message: string; cursor: string }
export interface RealtimeError { type: 'error'; roomId?: string; error: { code: string; message: string } }
export interface PresenceState { type: 'presence_state'; roomId: string; payload: Record<string, Json> }
export interface PresenceDiff { type: 'presence_diff'; roomId: string;
  payload: { joins: Record<string, Json>; leaves: Record<string, Json> } }
export type RealtimeMessage = DbEvent | SchemaEvent | BroadcastEvent | ResyncRequired | RealtimeError
  | PresenceState | PresenceDiff;

export class Channel {
  readonly room: string;
  /** The cursor of the last event delivered: save it to resume later with `since`. */
  readonly cursor: string | null;
  readonly subscribed: boolean;
  readonly duplicatesDropped: number;
  on(cb: (msg: RealtimeMessage) => void): () => void;
  next(timeoutMs?: number): Promise<RealtimeMessage>;
  [Symbol.asyncIterator](): AsyncIterator<RealtimeMessage>;
  broadcast(event: string, payload?: Json): void;
  /** Topics: the members as last described by the server (key → state). */
  readonly presence: Record<string, Json>;
  readonly presenceKey: string | null;
  track(state: { [k: string]: Json }, opts?: { timeoutMs?: number }): Promise<string>;
  untrack(opts?: { timeoutMs?: number }): Promise<void>;
  unsubscribe(): void;
}
export interface RowFilter {
  column: string;
  op: 'eq' | 'neq' | 'lt' | 'lte' | 'gt' | 'gte' | 'in';
  value: string | number | boolean | Array<string | number | boolean>;
}
export interface RealtimeOptions {
  token?: string | (() => Promise<string>);
  url?: string;
  heartbeatMs?: number;
  heartbeatTimeoutMs?: number;
  backoffBaseMs?: number;
  backoffMaxMs?: number;
  onStatus?: (status: 'connected' | 'disconnected') => void;
}
export class Realtime {
  readonly reconnects: number;
  subscribe(opts?: { tables?: string[]; operations?: string[]; since?: string; onEvent?: (m: RealtimeMessage) => void; timeoutMs?: number; filters?: Record<string, RowFilter>; topic?: string }): Promise<Channel>;
  disconnect(): void;
  close(): void;
}

export class FluxbaseClient {
  constructor(options: ClientOptions);
  readonly projectId: string;
  readonly auth: Auth;
  readonly storage: Storage;
  request(method: string, path: string, opts?: Record<string, unknown>): Promise<any>;
  sql<R = Row>(query: string, params?: Param[], opts?: { authUid?: string }): Promise<SqlResult<R>>;
  batch(statements: Statement[], opts?: { readOnly?: boolean; isolationLevel?: string; authUid?: string }): Promise<SqlResult[]>;
  transaction(statements: Statement[], opts?: { readOnly?: boolean; isolationLevel?: string; authUid?: string }): Promise<SqlResult[]>;
  from<R = Row>(table: string): Query<R>;
  realtimeToken(opts?: { authUid?: string; expiresIn?: number }): Promise<{ token: string; expiresAt: number; projectId: string }>;
  broadcast(event: string, payload?: Json): Promise<number>;
  realtime(opts?: RealtimeOptions): Realtime;
}
export function createClient(options: ClientOptions): FluxbaseClient;
export function compareCursors(a: string, b: string): -1 | 0 | 1;
export function toJSONValue(v: unknown): unknown;
export function verifyWebhook(rawBody: string | Uint8Array | ArrayBuffer, headers: Headers | Record<string, string>, secret: string,
  opts?: { toleranceSec?: number; now?: number }): Promise<any>;
export { verifyWebhook as verify };
