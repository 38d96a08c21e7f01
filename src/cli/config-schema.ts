// JSON Schema (draft 2020-12) of the --config file. Names follow qemu-storage-daemon's QMP
// arguments (blockdev-add, block-export-add) so an operator can copy from QEMU's documentation;
// our extras use the same kebab-case style. `x-expected` is an annotation read by config.ts to
// say what a pattern or a type mismatch expected, in words.

const NAME = '^[A-Za-z][A-Za-z0-9_.-]*$';
const NAME_WORDS = 'a name that starts with a letter and has only letters, digits, "-", "." and "_"';

/** node-name as QEMU's id_wellformed() and its 32-byte node_name field allow */
const nodeName = { type: 'string', pattern: NAME, minLength: 1, maxLength: 31, 'x-expected': `${NAME_WORDS} (at most 31)` } as const;
const exportId = { type: 'string', pattern: NAME, minLength: 1, maxLength: 127, 'x-expected': NAME_WORDS } as const;

/** bytes: an integer, or a string parsed by args.ts' parseSize (suffixes K M G T, powers of 1024) */
const size = {
  type: ['integer', 'string'],
  minimum: 1,
  pattern: '^\\s*\\d+[KMGTkmgt]?([iI]?[bB])?\\s*$',
  'x-expected': "a size: bytes as an integer, or a string such as '512M' or '8G' (K, M, G, T are powers of 1024)",
} as const;
const rate = { ...size, minimum: 0, 'x-expected': "bytes per second: an integer, or a string such as '10M'" } as const;
const iops = { type: 'integer', minimum: 0 } as const;

const mode = {
  type: 'string',
  pattern: '^0?[0-7]{3}$',
  'x-expected': "an octal mode string such as '0600' or '0660' (at most 0777)",
} as const;
const userOrGroup = (what: 'user' | 'group') =>
  ({ type: ['string', 'integer'], minLength: 1, minimum: 0, maximum: 2 ** 32 - 2, 'x-expected': `a ${what} name or a numeric ${what === 'user' ? 'uid' : 'gid'}` }) as const;
const idList = (what: 'user' | 'group') => ({ type: 'array', minItems: 1, items: userOrGroup(what) }) as const;

/** mode, owner and group of a unix socket file (--socket-mode/-owner/-group, --control-mode/...) */
const socketFile = {
  type: 'object',
  additionalProperties: false,
  properties: { mode, owner: userOrGroup('user'), group: userOrGroup('group') },
} as const;

const fileNode = {
  type: 'object',
  additionalProperties: false,
  required: ['node-name', 'driver', 'filename'],
  properties: {
    'node-name': nodeName,
    driver: { enum: ['file', 'host_device'] },
    filename: { type: 'string', minLength: 1 },
    'read-only': { type: 'boolean' },
    cache: {
      type: 'object',
      'x-expected': 'an object {"direct": true|false, "no-flush": true|false} (the command line\'s --cache=none is {"direct": true})',
      additionalProperties: false,
      properties: { direct: { type: 'boolean' }, 'no-flush': { type: 'boolean' } },
    },
    locking: { enum: ['auto', 'on', 'off'] },
  },
} as const;

const nullNode = {
  type: 'object',
  additionalProperties: false,
  required: ['node-name', 'driver', 'size'],
  properties: {
    'node-name': nodeName,
    driver: { enum: ['null-co', 'null'] },
    size,
    'read-only': { type: 'boolean' },
  },
} as const;

/** QEMU's rbd driver options; key (the cephx key itself) and keyring (a file) are ours, instead of QEMU's key-secret object */
const rbdNode = {
  type: 'object',
  additionalProperties: false,
  required: ['node-name', 'driver', 'pool', 'image'],
  properties: {
    'node-name': nodeName,
    driver: { const: 'rbd' },
    pool: { type: 'string', minLength: 1 },
    image: { type: 'string', minLength: 1 },
    conf: { type: 'string', minLength: 1 },
    user: { type: 'string', minLength: 1 },
    namespace: { type: 'string', minLength: 1 },
    snapshot: { type: 'string', minLength: 1 },
    key: { type: 'string', minLength: 1 },
    keyring: { type: 'string', minLength: 1 },
    'read-only': { type: 'boolean' },
    cache: fileNode.properties.cache,
  },
} as const;

/** QEMU's nbd driver options (BlockdevOptionsNbd); tls-creds is not accepted: vubd does not do NBD over TLS */
const nbdNode = {
  type: 'object',
  additionalProperties: false,
  required: ['node-name', 'driver', 'server'],
  properties: {
    'node-name': nodeName,
    driver: { const: 'nbd' },
    server: {
      type: 'object',
      'x-expected': 'a server address {"type": "inet", "host": H, "port": "P"} or {"type": "unix", "path": P}',
      discriminator: { propertyName: 'type' },
      oneOf: [
        {
          type: 'object',
          additionalProperties: false,
          required: ['type', 'host', 'port'],
          properties: {
            type: { const: 'inet' },
            host: { type: 'string', minLength: 1 },
            port: { type: ['string', 'integer'], pattern: '^[0-9]{1,5}$', minimum: 1, maximum: 65535 },
          },
        },
        {
          type: 'object',
          additionalProperties: false,
          required: ['type', 'path'],
          properties: { type: { const: 'unix' }, path: { type: 'string', minLength: 1, maxLength: 107 } },
        },
      ],
    },
    export: { type: 'string' },
    'reconnect-delay': { type: 'integer', minimum: 0 },
    'open-timeout': { type: 'integer', minimum: 0 },
    'read-only': { type: 'boolean' },
  },
} as const;

/** QEMU's throttle-group property names */
export const IOPS_LIMITS = ['iops-total', 'iops-total-max', 'iops-read', 'iops-read-max', 'iops-write', 'iops-write-max'] as const;
export const BPS_LIMITS = ['bps-total', 'bps-total-max', 'bps-read', 'bps-read-max', 'bps-write', 'bps-write-max'] as const;

const throttleNode = {
  type: 'object',
  additionalProperties: false,
  required: ['node-name', 'driver', 'file'],
  properties: {
    'node-name': nodeName,
    driver: { const: 'throttle' },
    file: { ...nodeName, 'x-expected': 'the node-name of the node below this one' },
    limits: {
      type: 'object',
      additionalProperties: false,
      properties: Object.fromEntries([...IOPS_LIMITS.map((k) => [k, iops]), ...BPS_LIMITS.map((k) => [k, rate])]),
    },
  },
} as const;

const unixAddr = {
  type: 'object',
  additionalProperties: false,
  required: ['type', 'path'],
  properties: { type: { const: 'unix' }, path: { type: 'string', minLength: 1, maxLength: 107 } },
} as const;
const fdAddr = {
  type: 'object',
  additionalProperties: false,
  required: ['type', 'str'],
  properties: {
    type: { const: 'fd' },
    str: { type: 'string', pattern: '^\\d{1,7}$', 'x-expected': "a file descriptor number as a string, such as '3'" },
  },
} as const;

const vqMapping = {
  type: 'array',
  minItems: 1,
  items: {
    type: 'object',
    additionalProperties: false,
    required: ['iothread'],
    properties: {
      iothread: { type: 'string', pattern: '^worker(0|[1-9][0-9]{0,3})$', 'x-expected': "a pool worker's name: 'worker0', 'worker1', ..." },
      vqs: { type: 'array', minItems: 1, items: { type: 'integer', minimum: 0 } },
    },
  },
} as const;

const vhostUserBlkExport = {
  type: 'object',
  additionalProperties: false,
  required: ['type', 'id', 'node-name', 'addr'],
  properties: {
    type: { const: 'vhost-user-blk' },
    id: exportId,
    'node-name': nodeName,
    addr: { type: 'object', discriminator: { propertyName: 'type' }, oneOf: [unixAddr, fdAddr] },
    writable: { type: 'boolean' },
    writethrough: { type: 'boolean' },
    'num-queues': { type: 'integer', minimum: 1, maximum: 64 },
    'logical-block-size': { enum: [512, 4096] },
    'iothread-vq-mapping': vqMapping,
    // vubd's own, as on its command line
    'queue-size': { enum: [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768] },
    serial: { type: 'string', maxLength: 20 },
    'ring-packed': { type: 'boolean' },
    socket: socketFile,
    'allow-uid': idList('user'),
    'allow-gid': idList('group'),
  },
} as const;

export const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'] as const;

export const CONFIG_SCHEMA = {
  $schema: 'https://json-schema.org/draft/2020-12/schema',
  title: 'vubd --config file',
  type: 'object',
  additionalProperties: false,
  properties: {
    $schema: { type: 'string' },
    workers: { type: 'integer', minimum: 1, maximum: 1024 },
    control: {
      type: 'object',
      additionalProperties: false,
      required: ['path'],
      properties: { path: { type: 'string', minLength: 1, maxLength: 107 }, ...socketFile.properties },
    },
    // parsed by args.ts' parseMetricsAddress, as --metrics is
    metrics: { type: ['string', 'integer'], minLength: 1, 'x-expected': "[ADDR:]PORT, such as '127.0.0.1:9180', '[::1]:9180' or 9180" },
    'log-level': { enum: LOG_LEVELS },
    aio: { enum: ['io_uring', 'sync'] },
    'poll-us': { type: 'integer', minimum: 0, maximum: 1_000_000 },
    incoming: { type: 'boolean' },
    nodes: {
      type: 'array',
      items: { type: 'object', discriminator: { propertyName: 'driver' }, oneOf: [fileNode, nullNode, nbdNode, rbdNode, throttleNode] },
    },
    exports: {
      type: 'array',
      items: vhostUserBlkExport,
    },
  },
} as const;
