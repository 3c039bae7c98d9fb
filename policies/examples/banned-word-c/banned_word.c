/*
 * banned-word: a Hotpath policy in plain C, with no libc (policies/ABI.md, version 1).
 *
 * It rejects, with FORBIDDEN, a message whose request "content" contains the word
 * "forbidden-word" when the conversation's type is "group", and allows everything else.
 *
 * The input is JSON the host wrote, so it is well formed; the scan below still never reads
 * past the input and answers a verdict outside the ABI ("error", a policy failure) rather
 * than guessing whenever it finds something it does not expect. It walks the JSON just far
 * enough to find request.content and facts.conversation.type at their real places (not a
 * "content" key nested in metadata, say), decoding string escapes as it goes, so
 * "forbidden\u002dword" is found too.
 */

#define WORD "forbidden-word"
#define WORD_LEN (sizeof(WORD) - 1)

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

/* ------------------------------------------------------------------------------------------ */
/* Memory: a bump allocator over the linear memory past the static data. Nothing is freed:   */
/* the host uses a fresh instance for every evaluation.                                       */

extern u8 __heap_base;
static u32 bump;

__attribute__((export_name("hotpath_alloc"))) int hotpath_alloc(int len) {
    if (len < 0) return 0;
    if (len == 0) len = 1; /* a real, non-zero pointer even for nothing */
    if (bump == 0) bump = (u32)&__heap_base;
    u64 start = ((u64)bump + 7) & ~(u64)7;
    u64 end = start + (u64)len;
    u64 have = (u64)__builtin_wasm_memory_size(0) * 65536;
    if (end > have) {
        u64 pages = (end - have + 65535) / 65536;
        if (__builtin_wasm_memory_grow(0, (unsigned long)pages) == (unsigned long)-1) return 0;
    }
    bump = (u32)end;
    return (int)start;
}

__attribute__((export_name("hotpath_abi_version"))) int hotpath_abi_version(void) { return 1; }

/* ------------------------------------------------------------------------------------------ */
/* Output: three fixed answers in static memory.                                               */

static const char ALLOW[] = "{\"verdict\":\"allow\"}";
static const char REJECT[] =
    "{\"verdict\":\"reject\",\"code\":\"FORBIDDEN\","
    "\"message\":\"forbidden: the message contains a banned word\","
    "\"details\":{\"word\":\"" WORD "\"}}";
static const char ERROR[] = "{\"verdict\":\"error\",\"message\":\"banned-word: cannot read the input\"}";

static long long located(const char *text, u32 len) {
    return (long long)(((u64)(u32)text << 32) | (u64)len);
}

/* ------------------------------------------------------------------------------------------ */
/* A cursor over the input JSON. `bad` is set on anything unexpected, and every reader then   */
/* stops advancing.                                                                            */

typedef struct {
    const u8 *p;
    const u8 *end;
    int bad;
} cursor;

static void ws(cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r')) c->p++;
}

static int peek(cursor *c) {
    ws(c);
    return c->p < c->end ? *c->p : -1;
}

static int expect(cursor *c, u8 ch) {
    if (peek(c) != ch) {
        c->bad = 1;
        return 0;
    }
    c->p++;
    return 1;
}

static int hexval(u8 h) {
    if (h >= '0' && h <= '9') return h - '0';
    if (h >= 'a' && h <= 'f') return h - 'a' + 10;
    if (h >= 'A' && h <= 'F') return h - 'A' + 10;
    return -1;
}

/*
 * The next character of the string the cursor is in, decoded: an ASCII character as itself,
 * any byte of a multi-byte UTF-8 sequence as itself (never equal to an ASCII letter), a
 * \uXXXX escape of an ASCII character as that character and of anything else as 0x80 (never
 * equal to an ASCII letter). Returns -1 at the closing quote (consumed), -2 on an error.
 */
static int next_char(cursor *c) {
    if (c->p >= c->end) return -2;
    u8 ch = *c->p++;
    if (ch == '"') return -1;
    if (ch < 0x20) return -2; /* raw control characters are not valid JSON */
    if (ch != '\\') return ch;
    if (c->p >= c->end) return -2;
    ch = *c->p++;
    switch (ch) {
        case '"': case '\\': case '/': return ch;
        case 'b': return '\b';
        case 'f': return '\f';
        case 'n': return '\n';
        case 'r': return '\r';
        case 't': return '\t';
        case 'u': {
            if (c->end - c->p < 4) return -2;
            int v = 0;
            for (int i = 0; i < 4; i++) {
                int h = hexval(c->p[i]);
                if (h < 0) return -2;
                v = v * 16 + h;
            }
            c->p += 4;
            return v < 0x80 ? v : 0x80;
        }
        default: return -2;
    }
}

/* Reads a string (the cursor on its opening quote); whether it equals the ASCII `lit`. */
static int string_equals(cursor *c, const char *lit) {
    if (!expect(c, '"')) return 0;
    int same = 1;
    const char *l = lit;
    for (;;) {
        int ch = next_char(c);
        if (ch == -2) {
            c->bad = 1;
            return 0;
        }
        if (ch == -1) return same && *l == 0;
        if (*l == 0 || ch != (u8)*l) same = 0;
        else l++;
    }
}

/* Reads a string (the cursor on its opening quote); whether it contains WORD. */
static int string_contains_word(cursor *c) {
    if (!expect(c, '"')) return 0;
    /* The last WORD_LEN characters, in a ring. */
    int ring[WORD_LEN];
    u32 seen = 0;
    int found = 0;
    for (;;) {
        int ch = next_char(c);
        if (ch == -2) {
            c->bad = 1;
            return 0;
        }
        if (ch == -1) return found;
        if (found) continue; /* still read to the closing quote */
        ring[seen % WORD_LEN] = ch;
        seen++;
        if (seen >= WORD_LEN) {
            int match = 1;
            for (u32 i = 0; i < WORD_LEN && match; i++) {
                if (ring[(seen + i) % WORD_LEN] != (u8)WORD[i]) match = 0;
            }
            found = match;
        }
    }
}

/* Skips one value of any kind, without recursion: nesting only counts brackets. */
static void skip_value(cursor *c) {
    int first = peek(c);
    if (first == '"') {
        string_equals(c, "");
        return;
    }
    if (first == '{' || first == '[') {
        u32 depth = 0;
        while (c->p < c->end) {
            u8 ch = *c->p;
            if (ch == '"') {
                string_equals(c, "");
                if (c->bad) return;
                continue;
            }
            c->p++;
            if (ch == '{' || ch == '[') depth++;
            else if (ch == '}' || ch == ']') {
                if (--depth == 0) return;
            }
        }
        c->bad = 1;
        return;
    }
    /* A number, true, false or null: up to the next delimiter. */
    const u8 *start = c->p;
    while (c->p < c->end && *c->p != ',' && *c->p != '}' && *c->p != ']' && *c->p != ' ' &&
           *c->p != '\t' && *c->p != '\n' && *c->p != '\r')
        c->p++;
    if (c->p == start) c->bad = 1;
}

/*
 * Walks the object at the cursor, calling `on_member` with the cursor on each member's value;
 * `on_member` consumes the value (or leaves it for skipping by returning 0).
 */
typedef int (*member_fn)(cursor *c, const u8 *key, u32 key_len, void *state);

static void walk_object(cursor *c, member_fn on_member, void *state) {
    if (!expect(c, '{')) return;
    if (peek(c) == '}') {
        c->p++;
        return;
    }
    for (;;) {
        /* The keys this policy looks for have no escapes; a key with escapes (or any other
         * key) is simply not one of them. */
        if (!expect(c, '"')) return;
        const u8 *key = c->p;
        while (c->p < c->end && *c->p != '"') {
            if (*c->p == '\\') c->p++;
            c->p++;
        }
        if (c->p >= c->end) {
            c->bad = 1;
            return;
        }
        u32 key_len = (u32)(c->p - key);
        c->p++;
        if (!expect(c, ':')) return;
        ws(c);
        if (!on_member(c, key, key_len, state)) skip_value(c);
        if (c->bad) return;
        int next = peek(c);
        if (next == ',') {
            c->p++;
            continue;
        }
        if (next == '}') {
            c->p++;
            return;
        }
        c->bad = 1;
        return;
    }
}

static int key_is(const u8 *key, u32 len, const char *name) {
    u32 i = 0;
    for (; i < len; i++) {
        if (name[i] == 0 || key[i] != (u8)name[i]) return 0;
    }
    return name[i] == 0;
}

typedef struct {
    int has_word; /* request.content is a string containing WORD */
    int is_group; /* facts.conversation.type is "group" */
} findings;

static int in_conversation(cursor *c, const u8 *key, u32 len, void *state) {
    findings *f = state;
    if (key_is(key, len, "type")) {
        f->is_group = 0;
        if (peek(c) == '"') {
            f->is_group = string_equals(c, "group");
            return 1;
        }
    }
    return 0; /* not ours, or not a string: skipped */
}

static int in_facts(cursor *c, const u8 *key, u32 len, void *state) {
    findings *f = state;
    if (key_is(key, len, "conversation")) {
        f->is_group = 0;
        if (peek(c) == '{') {
            walk_object(c, in_conversation, state);
            return 1;
        }
    }
    return 0;
}

static int in_request(cursor *c, const u8 *key, u32 len, void *state) {
    findings *f = state;
    if (key_is(key, len, "content")) {
        f->has_word = 0;
        if (peek(c) == '"') {
            f->has_word = string_contains_word(c);
            return 1;
        }
    }
    return 0;
}

static int in_input(cursor *c, const u8 *key, u32 len, void *state) {
    findings *f = state;
    if (key_is(key, len, "request")) {
        f->has_word = 0;
        if (peek(c) == '{') {
            walk_object(c, in_request, state);
            return 1;
        }
    } else if (key_is(key, len, "facts")) {
        f->is_group = 0;
        if (peek(c) == '{') {
            walk_object(c, in_facts, state);
            return 1;
        }
    }
    return 0;
}

__attribute__((export_name("hotpath_validate"))) long long hotpath_validate(int ptr, int len) {
    if (len < 0 || (ptr == 0 && len > 0)) return located(ERROR, sizeof(ERROR) - 1);
    cursor c = {(const u8 *)ptr, (const u8 *)ptr + len, 0};
    findings f = {0, 0};
    walk_object(&c, in_input, &f);
    if (!c.bad && peek(&c) != -1) c.bad = 1; /* trailing bytes */
    if (c.bad) return located(ERROR, sizeof(ERROR) - 1);
    if (f.has_word && f.is_group) return located(REJECT, sizeof(REJECT) - 1);
    return located(ALLOW, sizeof(ALLOW) - 1);
}
