"""Hard limits of the ABI. The kernel enforces them; the SDK checks them early."""

#: Version of the wire protocol. A request with another version gets EPROTONOSUPPORT.
ABI_VERSION = 1

#: Largest frame the codec accepts (bytes). Larger ones get E2BIG.
MAX_FRAME_BYTES = 1 << 20
#: Transport-level cap (ZMQ_MAXMSGSIZE): a peer sending more is disconnected outright.
MAX_TRANSPORT_BYTES = 8 << 20
MAX_PEER_BACKLOG_BYTES = 32 << 20  # replies held for one peer that does not read (then dropped)
#: Longest string / most items / deepest nesting the decoder builds.
MAX_STR_BYTES = MAX_FRAME_BYTES
MAX_ARRAY_ITEMS = 4096
MAX_MAP_ITEMS = 256

#: Names (process names, syscall names, model names).
MAX_NAME_CHARS = 64
MAX_TOKEN_CHARS = 128
#: Text of one prompt / message / system prompt, in characters.
MAX_TEXT_CHARS = 200_000
#: Messages in one call.
MAX_MESSAGES = 1024
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64
MAX_OUTPUT_TOKENS = 8192
#: Structured output (llm.generate's response_format): a JSON Schema's size as compact
#: JSON and its nesting depth, the choices of a choice format, a regex, an EBNF grammar.
MAX_SCHEMA_BYTES = 32_768
MAX_SCHEMA_DEPTH = 64
#: Deepest nesting of maps and arrays in a request frame (as for schemas): deeper input
#: could exhaust the recursion of whatever later walks it (validation, json.dumps).
MAX_FRAME_DEPTH = 64
MAX_CHOICES = 256
MAX_CHOICE_CHARS = 1_000
MAX_PATTERN_CHARS = 2_000
MAX_GRAMMAR_CHARS = 32_768

#: Deadlines, in milliseconds from when the kernel receives the request.
DEFAULT_DEADLINE_MS = 30_000
DEFAULT_GENERATE_DEADLINE_MS = 600_000
MAX_DEADLINE_MS = 24 * 3600 * 1000

#: Process priorities are Unix nice values: lower runs first.
NICE_MIN, NICE_MAX = -20, 19

#: Memory: core blocks (labelled text always in the prompt), archival entries.
MAX_BLOCKS = 16
MAX_BLOCK_CHARS = 16_000
DEFAULT_BLOCK_CHARS = 2_000
MAX_ENTRY_CHARS = 8_000
MAX_PUT_ENTRIES = 256
MAX_META_KEYS = 16
MAX_SEARCH_K = 100
MAX_SNAPSHOTS = 32
#: Smallest context window a process may ask for (tokens).
MIN_CTX_WINDOW = 128
MAX_CONTEXT_BYTES = 32 << 20  # one process's context (UTF-8 content), then E2BIG

# Files (kernel/fs.py).
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_IO_BYTES = 960 << 10  # data in one fs.read / fs.write (a frame is at most 1 MiB)
MAX_FILE_BYTES = 8 << 20  # one file (grown with fs.append)
FS_AREA_BYTES = 256 << 20  # a process's root, or a program's home
MAX_FS_VERSIONS = 100  # kept per path, newest first
MAX_LIST_ENTRIES = 10_000
MAX_MOUNTS = 16

# Tools (kernel/tools.py).
MAX_TOOL_ARGS_BYTES = 256 << 10  # JSON arguments of one tool call
MAX_TOOL_RESULT_BYTES = 512 << 10  # JSON result of one tool call
MAX_SERVED_TOOLS = 64  # tools one process may serve
MAX_TOOL_QUEUE = 256  # calls waiting for one serving process
TOOL_VALIDATION_S = 1.0  # checking one call's arguments against its tool's schema
MAX_TOOL_VALIDATIONS = 64  # tool calls being validated at once (then EAGAIN)
MAX_PARKED_CALLS = 256  # calls waiting for the owner's confirmation
MAX_CALLS_IN_FLIGHT = 16384  # asynchronous syscalls in flight in the whole kernel
MAX_CALLS_IN_FLIGHT_PER_PROCESS = 256  # ... of one process (its max_calls_in_flight limit)
MAX_TOOL_PATTERNS = 32  # tool capability patterns given at spawn
PY_MEMORY_BYTES = 512 << 20  # address space of the python tool's process

# MCP servers mounted as tools (kernel/mcp.py).
MAX_MCP_SERVERS = 32  # servers mounted at once
MAX_MCP_TOOLS = 128  # tools taken from one server (the rest are refused, logged)
MAX_MCP_SCHEMA_BYTES = 64 << 10  # one tool's inputSchema, as JSON
MAX_MCP_SCHEMA_DEPTH = 16  # nesting of objects and arrays in one inputSchema
MAX_MCP_TARGET_CHARS = 4096  # a server's command line or URL
MAX_MCP_ENV = 64  # environment variables given to one stdio server
MAX_MCP_HEADERS = 32  # headers sent to one streamable-HTTP server
MAX_MCP_SECRET_CHARS = 8192  # one environment variable's or header's value

#: IPC: one message's body (its compact JSON, in bytes), nesting, and each mailbox's bounds.
MAX_IPC_MESSAGE_BYTES = 64 * 1024
MAX_IPC_DEPTH = 32
MAILBOX_MAX_MESSAGES = 256
MAILBOX_MAX_BYTES = 1 << 20
#: Bytes queued in all mailboxes together (a published copy counts once per mailbox).
MAX_IPC_BYTES = 256 << 20
#: Topics: name length, subscriptions per process, distinct topics in the kernel.
MAX_TOPIC_CHARS = 128
MAX_SUBSCRIPTIONS = 64
MAX_TOPICS = 4096

#: Detached generations (runs, kernel/runs.py): how many the kernel and one process may
#: hold (queued, running, or finished and not yet collected; more get EAGAIN), how long a
#: finished run's result is kept uncollected, the text all kept runs may hold together
#: (over it the oldest finished results go first), and the longest a run may go on.
MAX_RUNS = 1024
MAX_RUNS_PER_PROC = 16
RUN_TTL_S = 3600.0
MAX_RUN_BYTES = 64 << 20
MAX_RUN_S = 24 * 3600.0
