/*
 * fluxbase_capture: the capture trigger functions in C (issue 20, "capture that costs less").
 *
 * fluxbase_capture.capture_insert() / capture_delete() (statement-level AFTER triggers with a
 * transition table) and capture_update() (row-level AFTER UPDATE) with the semantics of
 * sql/0036 and sql/0048, without PL/pgSQL's per-transaction executor setup:
 *
 *  - The fast path is a project session's: the session user is p_<16 hex>_(admin|rw|ro|rt) and
 *    the table's schema is p_<the same 16 hex>. Everything else (a platform session, which
 *    write_events attributes by the schema; a refusal) and every row whose images are over
 *    1 MiB (write_events keeps their small fields) goes to the PL/pgSQL
 *    fluxbase_capture.write_events(regclass, text, jsonb[], jsonb[]) through SPI, called as the
 *    invoker exactly as the PL/pgSQL triggers call it, so those paths keep their behaviour.
 *  - Row images are built as the invoker (the tenant), byte for byte what to_jsonb(row) gives,
 *    from an image plan kept per relation (row_image below): output functions and casts to json
 *    of the tenant's types run with the tenant's own rights. The
 *    user id is switched (to fluxbase_outbox_writer, SECURITY_RESTRICTED_OPERATION) only around
 *    the outbox INSERT and the doorbell query: two saved plans whose every name is
 *    schema-qualified, with no function or operator a tenant can define, on built-in-typed
 *    parameters. Nothing tenant-defined runs while the user id is switched.
 *  - One outbox row per row (project_id, 'row', table_name, operation, record, old, bytes =
 *    pg_column_size(record) + pg_column_size(old)), and the doorbell (EXISTS a waiting reader
 *    -> NOTIFY fluxbase_events) once per statement that wrote an event, as write_events does.
 *    A DELETE's old image is its record: stored once (`old` NULL, sql/0053), counted twice in
 *    `bytes`; the readers give it as both.
 *
 * The functions are SECURITY INVOKER; `fluxbase migrate` installs them when this library loads
 * (fluxbase/db/capture.py) and keeps the PL/pgSQL ones (sql/0049) otherwise.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/dependency.h"
#include "catalog/index.h"
#include "catalog/namespace.h"
#include "catalog/pg_am.h"
#include "catalog/pg_type.h"
#include "commands/async.h"
#include "commands/portalcmds.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "storage/bufmgr.h"
#include "storage/freespace.h"
#include "storage/lock.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/guc_tables.h"
#include "utils/errcodes.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/jsonfuncs.h"
#include "utils/lsyscache.h"
#include "utils/numeric.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"
#include "utils/xid8.h"
#if PG_VERSION_NUM >= 180000
#include "rewrite/rewriteHandler.h"
#endif

PG_MODULE_MAGIC;

void		_PG_init(void);

PG_FUNCTION_INFO_V1(fluxbase_capture_insert);
PG_FUNCTION_INFO_V1(fluxbase_capture_delete);
PG_FUNCTION_INFO_V1(fluxbase_capture_update);

#define CAPTURE_MAX_IMAGE_BYTES 1048576
#define OUTBOX_WRITER "fluxbase_outbox_writer"

/* Saved plans (SPI_keepplan), prepared on first use in this backend. */
static SPIPlanPtr insert_plan = NULL;
static SPIPlanPtr bell_plan = NULL;
static SPIPlanPtr delegate_plan = NULL;

/* The session user's verdict, by its oid (SET SESSION AUTHORIZATION changes the oid), until
 * any change to pg_authid (a rename from another session: roles_inval). */
static Oid cached_session_user = InvalidOid;
static bool cached_is_project = false;
static char cached_project[17];

static const char *const INSERT_SQL =
	"INSERT INTO fluxbase.events (project_id, kind, table_name, operation, record, old, bytes) "
	"VALUES ($1, 'row', $2, $3, $4, $5, $6)";
static const char *const BELL_SQL =
	"SELECT EXISTS (SELECT 1 FROM fluxbase.event_readers WHERE waiting)";
static const char *const DELEGATE_SQL =
	"SELECT fluxbase_capture.write_events($1, $2, $3, $4)";

static bool
is_lower_hex(char c)
{
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

/* Is the session user p_<16 hex>_(admin|rw|ro|rt)? Its 16 hex digits into project[17]. */
static bool
session_project(char *project)
{
	Oid			su = GetSessionUserId();

	if (su != cached_session_user || !OidIsValid(cached_session_user))
	{
		char	   *name = GetUserNameFromId(su, true);
		bool		ok = false;
		char		found[17];

		if (name != NULL)
		{
			size_t		len = strlen(name);

			if (len >= 21 && name[0] == 'p' && name[1] == '_' && name[18] == '_')
			{
				const char *suffix = name + 19;
				int			i;

				ok = true;
				for (i = 2; i < 18; i++)
					if (!is_lower_hex(name[i]))
						ok = false;
				if (ok)
					ok = strcmp(suffix, "admin") == 0 || strcmp(suffix, "rw") == 0 ||
						strcmp(suffix, "ro") == 0 || strcmp(suffix, "rt") == 0;
				if (ok)
				{
					memcpy(found, name + 2, 16);
					found[16] = '\0';
				}
			}
			pfree(name);
		}
		if (ok)
			memcpy(cached_project, found, 17);
		cached_is_project = ok;
		cached_session_user = su;
	}
	if (!cached_is_project)
		return false;
	memcpy(project, cached_project, 17);
	return true;
}

/* The verdict on the last table schema seen (its oid: p_<16 hex>, and which), until any change
 * to pg_namespace (names_inval). */
static Oid	cached_nsp = InvalidOid;
static bool cached_nsp_is_project = false;
static char cached_nsp_project[17];

/* The fast path: a project session writing a table of its own project's schema. */
static bool
fast_path(Relation rel, char *project)
{
	Oid			nsp = RelationGetNamespace(rel);

	if (!session_project(project))
		return false;
	if (nsp != cached_nsp || !OidIsValid(cached_nsp))
	{
		char	   *nspname = get_namespace_name(nsp);

		cached_nsp_is_project = nspname != NULL && strlen(nspname) == 18 && nspname[0] == 'p' &&
			nspname[1] == '_';
		if (cached_nsp_is_project)
		{
			memcpy(cached_nsp_project, nspname + 2, 16);
			cached_nsp_project[16] = '\0';
		}
		if (nspname != NULL)
			pfree(nspname);
		cached_nsp = nsp;
	}
	return cached_nsp_is_project && memcmp(cached_nsp_project, project, 16) == 0;
}

/*
 * Row images: to_jsonb(row), byte for byte, without what PostgreSQL's composite_to_jsonb does
 * again for every row: json_categorize_type of every column (syscache lookups of its type, its
 * base type, element type, cast to json), a copy of the row as a composite datum, the text
 * round trip of an integer into a numeric, and sorting the keys.
 *
 * Per relation, an image plan is kept: every live column's attnum and type, its
 * JsonTypeCategory and output function as json_categorize_type answers, and the columns in the
 * order of jsonb's keys (shorter names first, then bytewise: the order uniqueifyJsonbObject
 * sorts them into; it still sorts, so a stale order could only cost time, never change the
 * image). Each value is turned into a JsonbValue as datum_to_jsonb_internal does: bool, an
 * integer (int2/int4/int8, or a domain over one: int64_to_numeric, what numeric_in of its text
 * gives), date/timestamp/timestamptz (JsonEncodeDateTime), NULL, and the other scalar types
 * (their output function's text; text, varchar and bpchar as they are), and a jsonb column is
 * unpacked into the object as datum_to_jsonb_internal does. Everything else (numeric, float4,
 * float8, arrays, composites, json, a type with a cast to json) goes through PostgreSQL's own
 * datum_to_jsonb, whose result pushJsonbValue unpacks into the object. Output functions and
 * casts still run as the invoker. tests/test_capture_native.py compares the images with
 * to_jsonb of the same rows for many types.
 *
 * A plan is kept until a relcache invalidation of its relation (ALTER TABLE, a renamed column)
 * or any change to pg_type or pg_cast (a new cast to json changes a column's category): the
 * callbacks only clear a flag or bump image_gen; and every use compares the plan's column
 * types with the relation's tuple descriptor (else it is rebuilt). A call builds its image
 * from its own copy of the plan: a capture nested in a tenant's cast function may rebuild the
 * kept one.
 */
enum
{
	IMG_BOOL, IMG_INT2, IMG_INT4, IMG_INT8, IMG_DATE, IMG_TIMESTAMP, IMG_TIMESTAMPTZ, IMG_TEXT,
	IMG_OUT, IMG_JSONB, IMG_PG
};
typedef struct ImageCol
{
	AttrNumber	attnum;
	uint8		how;			/* IMG_* */
	JsonTypeCategory cat;
	Oid			typid;			/* the column's type when planned */
	Oid			outfn;
} ImageCol;
typedef struct ImagePlan
{
	int			natts;			/* the descriptor's natts when planned */
	int			ncols;			/* live columns */
	ImageCol	cols[FLEXIBLE_ARRAY_MEMBER];
} ImagePlan;
typedef struct ImageEntry
{
	Oid			relid;			/* hash key */
	bool		valid;
	uint64		gen;
	ImagePlan  *plan;			/* in images_cxt */
} ImageEntry;

static MemoryContext images_cxt = NULL;
static HTAB *images = NULL;
static uint64 image_gen = 1;

#define IMAGES_MAX_RELATIONS 256

static void
images_relcache_inval(Datum arg, Oid relid)
{
	ImageEntry *e;

	if (images == NULL)
		return;
	if (!OidIsValid(relid))
	{
		image_gen++;
		return;
	}
	e = (ImageEntry *) hash_search(images, &relid, HASH_FIND, NULL);
	if (e != NULL)
		e->valid = false;
}

static void
images_syscache_inval(Datum arg, int cacheid, uint32 hashvalue)
{
	image_gen++;
}

/* jsonb's key order (jsonb_util.c lengthCompareJsonbStringValue): length, then bytes. */
static TupleDesc plan_desc_for_sort;

static int
image_col_cmp(const void *a, const void *b)
{
	const char *na = NameStr(TupleDescAttr(plan_desc_for_sort, ((const ImageCol *) a)->attnum - 1)->attname);
	const char *nb = NameStr(TupleDescAttr(plan_desc_for_sort, ((const ImageCol *) b)->attnum - 1)->attname);
	size_t		la = strlen(na);
	size_t		lb = strlen(nb);

	if (la != lb)
		return la > lb ? 1 : -1;
	return memcmp(na, nb, la);
}

/* A plan for `desc`, palloc'd in the current memory context. */
static ImagePlan *
image_plan_build(TupleDesc desc)
{
	ImagePlan  *plan = palloc(offsetof(ImagePlan, cols) + sizeof(ImageCol) * (desc->natts > 0 ? desc->natts : 1));
	int			i;

	plan->natts = desc->natts;
	plan->ncols = 0;
	for (i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		ImageCol   *c;

		if (att->attisdropped)
			continue;
		c = &plan->cols[plan->ncols++];
		c->attnum = att->attnum;
		c->typid = att->atttypid;
		json_categorize_type(att->atttypid, true, &c->cat, &c->outfn);
		switch (c->cat)
		{
			case JSONTYPE_BOOL:
				c->how = IMG_BOOL;
				break;
			case JSONTYPE_NUMERIC:
				c->how = c->outfn == F_INT2OUT ? IMG_INT2 :
					c->outfn == F_INT4OUT ? IMG_INT4 :
					c->outfn == F_INT8OUT ? IMG_INT8 : IMG_PG;
				break;
			case JSONTYPE_DATE:
				c->how = IMG_DATE;
				break;
			case JSONTYPE_TIMESTAMP:
				c->how = IMG_TIMESTAMP;
				break;
			case JSONTYPE_TIMESTAMPTZ:
				c->how = IMG_TIMESTAMPTZ;
				break;
			case JSONTYPE_JSONB:
				c->how = IMG_JSONB;
				break;
			case JSONTYPE_OTHER:
				c->how = (c->outfn == F_TEXTOUT || c->outfn == F_VARCHAROUT || c->outfn == F_BPCHAROUT) ?
					IMG_TEXT : IMG_OUT;
				break;
			default:
				c->how = IMG_PG;
				break;
		}
	}
	plan_desc_for_sort = desc;
	if (plan->ncols > 1)
		qsort(plan->cols, plan->ncols, sizeof(ImageCol), image_col_cmp);
	return plan;
}

/* Does the plan still describe `desc` (same columns, same types)? */
static bool
image_plan_fits(const ImagePlan *plan, TupleDesc desc)
{
	int			i;
	int			live = 0;

	if (plan->natts != desc->natts)
		return false;
	for (i = 0; i < desc->natts; i++)
		if (!TupleDescAttr(desc, i)->attisdropped)
			live++;
	if (live != plan->ncols)
		return false;
	for (i = 0; i < plan->ncols; i++)
	{
		Form_pg_attribute att;

		if (plan->cols[i].attnum < 1 || plan->cols[i].attnum > desc->natts)
			return false;
		att = TupleDescAttr(desc, plan->cols[i].attnum - 1);
		if (att->attisdropped || att->atttypid != plan->cols[i].typid)
			return false;
	}
	return true;
}

/* This call's copy (current memory context) of the kept plan for `rel`, kept or rebuilt. */
static ImagePlan *
image_plan(Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);
	Oid			relid = RelationGetRelid(rel);
	ImageEntry *e;
	bool		found;
	ImagePlan  *plan;
	Size		size;

	if (images == NULL || hash_get_num_entries(images) >= IMAGES_MAX_RELATIONS)
	{
		HASHCTL		ctl;

		if (images != NULL)
			hash_destroy(images);
		images = NULL;
		if (images_cxt == NULL)
			images_cxt = AllocSetContextCreate(TopMemoryContext, "fluxbase_capture images",
											   ALLOCSET_SMALL_SIZES);
		MemoryContextReset(images_cxt);
		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(ImageEntry);
		ctl.hcxt = images_cxt;
		images = hash_create("fluxbase_capture image plans", 16, &ctl,
							 HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	e = (ImageEntry *) hash_search(images, &relid, HASH_ENTER, &found);
	if (!found)
	{
		e->valid = false;
		e->plan = NULL;
	}
	if (!e->valid || e->gen != image_gen || e->plan == NULL || !image_plan_fits(e->plan, desc))
	{
		MemoryContext old;
		ImagePlan  *built;

		/* set first: an invalidation while planning (catalog reads) leaves it stale */
		e->valid = true;
		e->gen = image_gen;
		if (e->plan != NULL)
			pfree(e->plan);
		e->plan = NULL;
		old = MemoryContextSwitchTo(images_cxt);
		built = image_plan_build(desc);
		MemoryContextSwitchTo(old);
		/* (planning reads catalogs only; no capture runs in it, so the entry is still ours) */
		e->plan = built;
	}
	size = offsetof(ImagePlan, cols) + sizeof(ImageCol) * (e->plan->ncols > 0 ? e->plan->ncols : 1);
	plan = palloc(size);
	memcpy(plan, e->plan, size);
	return plan;
}

/*
 * Virtual generated columns (PostgreSQL 18). PostgreSQL computes them when a row is read, never
 * for triggers: NEW, OLD and transition tables hold them as null. to_jsonb of the row selected
 * gives their value, so the image computes them too, from the relation's generation
 * expressions, over the row's stored columns. PostgreSQL allows only built-in functions,
 * operators and types in them (checked at CREATE and ALTER TABLE), and they run here as the
 * invoker, like the rest of the image, before the user id is switched for the outbox. A value
 * that fails to compute with a data exception (SQLSTATE class 22: a division by zero, an
 * overflow), which a SELECT of the row would raise, is left out of the image (never imaged as
 * null: virtuals_compute) rather than failing the tenant's write: each row's computation runs
 * in a subtransaction of its own. Any other error (a cancel, the request deadline, out of
 * memory) is raised as it is.
 */
typedef struct Virtuals
{
	int			n;
	Oid			relid;
	bool	   *omit;			/* by attnum - 1: failed to compute for this row */
	AttrNumber *attnums;
	ExprState **exprs;
	EState	   *estate;
	ExprContext *econtext;
	TupleTableSlot *slot;
} Virtuals;

/* The relation's virtual generated columns, ready to compute; NULL when it has none. */
static Virtuals *
virtuals_begin(Relation rel)
{
#if PG_VERSION_NUM >= 180000
	TupleDesc	desc = RelationGetDescr(rel);
	Virtuals   *v;
	int			i;

	if (desc->constr == NULL || !desc->constr->has_generated_virtual)
		return NULL;
	v = palloc0(sizeof(Virtuals));
	v->attnums = palloc(sizeof(AttrNumber) * desc->natts);
	v->omit = palloc0(sizeof(bool) * desc->natts);
	v->relid = RelationGetRelid(rel);
	v->exprs = palloc(sizeof(ExprState *) * desc->natts);
	v->estate = CreateExecutorState();
	for (i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (att->attisdropped || att->attgenerated != ATTRIBUTE_GENERATED_VIRTUAL)
			continue;
		v->attnums[v->n] = att->attnum;
		v->exprs[v->n] = ExecPrepareExpr((Expr *) build_generation_expression(rel, att->attnum),
										 v->estate);
		v->n++;
	}
	v->econtext = GetPerTupleExprContext(v->estate);
	v->slot = MakeSingleTupleTableSlot(desc, &TTSOpsHeapTuple);
	v->econtext->ecxt_scantuple = v->slot;
	return v;
#else
	return NULL;
#endif
}

static void
virtuals_end(Virtuals *v)
{
	if (v == NULL)
		return;
	ExecDropSingleTupleTableSlot(v->slot);
	FreeExecutorState(v->estate);
}

/* Compute the virtual columns [from, to) of the slot's row into values/isnull, in a
 * subtransaction: false when one failed with a data exception (then none of them may be used);
 * any other error is raised. */
static bool
virtuals_try(Virtuals *v, int from, int to, Datum *values, bool *isnull)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	volatile bool ok = true;
	int			i;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		for (i = from; i < to; i++)
		{
			AttrNumber	a = v->attnums[i];

			values[a - 1] = ExecEvalExprSwitchContext(v->exprs[i], v->econtext, &isnull[a - 1]);
		}
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
		/* as PL/pgSQL's exception blocks: copied, flushed, rolled back, then raised again */
		if (ERRCODE_TO_CATEGORY(edata->sqlerrcode) != ERRCODE_DATA_EXCEPTION)
			ReThrowError(edata);
		FreeErrorData(edata);
		ok = false;
	}
	PG_END_TRY();
	return ok;
}

/* Set the virtual columns' values and nulls of `tuple` (deformed into values/isnull); the
 * values live in the per-tuple context until the next call. A column that fails to compute is
 * marked in v->omit: its key is left out of the image, never imaged as null (null may pass a
 * SELECT policy that its value would not: the realtime gate refuses an image without a key a
 * policy needs, hostile review 27). All columns are computed at once; only a row where one
 * fails is computed again column by column. */
static void
virtuals_compute(Virtuals *v, HeapTuple tuple, Oid relid, Datum *values, bool *isnull)
{
	int			i;

	ResetExprContext(v->econtext);
	ExecStoreHeapTuple(tuple, v->slot, false);
	/* transition tables' tuples carry no table oid: the trigger's relation (review 27 F4) */
	v->slot->tts_tableOid = relid;
	for (i = 0; i < v->n; i++)
		v->omit[v->attnums[i] - 1] = false;
	if (!virtuals_try(v, 0, v->n, values, isnull))
	{
		ResetExprContext(v->econtext);
		for (i = 0; i < v->n; i++)
			if (!virtuals_try(v, i, i + 1, values, isnull))
				v->omit[v->attnums[i] - 1] = true;
	}
	ExecClearTuple(v->slot);
}

/* to_jsonb(row) of `tuple` (of `desc`, which the plan fits) with the plan (`virt`: the
 * relation's virtual generated columns, or NULL). */
static Datum
row_image(HeapTuple tuple, TupleDesc desc, const ImagePlan *plan, Virtuals *virt, Datum *values,
		  bool *isnull)
{
	JsonbParseState *state = NULL;
	JsonbValue *res;
	int			i;

	heap_deform_tuple(tuple, desc, values, isnull);
	if (virt != NULL)
		virtuals_compute(virt, tuple, virt->relid, values, isnull);
	pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	for (i = 0; i < plan->ncols; i++)
	{
		const ImageCol *c = &plan->cols[i];
		Form_pg_attribute att = TupleDescAttr(desc, c->attnum - 1);
		Datum		val = values[c->attnum - 1];
		JsonbValue	k;
		JsonbValue	v;

		if (virt != NULL && virt->omit[c->attnum - 1])
			continue;			/* a virtual column that failed to compute: no key */
		k.type = jbvString;
		k.val.string.val = NameStr(att->attname);
		k.val.string.len = strlen(k.val.string.val);
		pushJsonbValue(&state, WJB_KEY, &k);
		if (isnull[c->attnum - 1])
		{
			v.type = jbvNull;
			pushJsonbValue(&state, WJB_VALUE, &v);
			continue;
		}
		switch (c->how)
		{
			case IMG_BOOL:
				v.type = jbvBool;
				v.val.boolean = DatumGetBool(val);
				break;
			case IMG_INT2:
				v.type = jbvNumeric;
				v.val.numeric = int64_to_numeric(DatumGetInt16(val));
				break;
			case IMG_INT4:
				v.type = jbvNumeric;
				v.val.numeric = int64_to_numeric(DatumGetInt32(val));
				break;
			case IMG_INT8:
				v.type = jbvNumeric;
				v.val.numeric = int64_to_numeric(DatumGetInt64(val));
				break;
			case IMG_DATE:
			case IMG_TIMESTAMP:
			case IMG_TIMESTAMPTZ:
				v.type = jbvString;
				v.val.string.val = JsonEncodeDateTime(NULL, val,
													  c->how == IMG_DATE ? DATEOID :
													  c->how == IMG_TIMESTAMP ? TIMESTAMPOID : TIMESTAMPTZOID,
													  NULL);
				v.val.string.len = strlen(v.val.string.val);
				break;
			case IMG_TEXT:
			case IMG_OUT:
				v.type = jbvString;
				if (c->how == IMG_TEXT)
				{
					text	   *txt = DatumGetTextPP(val);

					v.val.string.val = VARDATA_ANY(txt);
					v.val.string.len = VARSIZE_ANY_EXHDR(txt);
				}
				else
				{
					v.val.string.val = OidOutputFunctionCall(c->outfn, val);
					v.val.string.len = strlen(v.val.string.val);
				}
				/* jsonb.c checkStringLen */
				if ((size_t) v.val.string.len > JENTRY_OFFLENMASK)
					ereport(ERROR,
							(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
							 errmsg("string too long to represent as jsonb string"),
							 errdetail("Due to an implementation restriction, jsonb strings cannot exceed %d bytes.",
									   JENTRY_OFFLENMASK)));
				break;
			case IMG_JSONB:
				{
					Jsonb	   *jb = DatumGetJsonbP(val);

					v.type = jbvBinary;
					v.val.binary.data = &jb->root;
					v.val.binary.len = VARSIZE(jb) - VARHDRSZ;
				}
				break;
			default:
				{
					Jsonb	   *jb = DatumGetJsonbP(datum_to_jsonb(val, c->cat, c->outfn));

					v.type = jbvBinary;
					v.val.binary.data = &jb->root;
					v.val.binary.len = VARSIZE(jb) - VARHDRSZ;
				}
				break;
		}
		pushJsonbValue(&state, WJB_VALUE, &v);
	}
	res = pushJsonbValue(&state, WJB_END_OBJECT, NULL);
	return JsonbPGetDatum(JsonbValueToJsonb(res));
}

/* The images of every row of a transition table, in its order (palloc'd in the caller's
 * memory context); *count set. */
static Datum *
transition_images(Tuplestorestate *ts, TupleDesc desc, const ImagePlan *plan, Virtuals *virt, int *count)
{
	TupleTableSlot *slot;
	int			ptr;
	int			n = 0;
	int			cap = 8;
	Datum	   *images = palloc(sizeof(Datum) * cap);
	Datum	   *values = palloc(sizeof(Datum) * (desc->natts > 0 ? desc->natts : 1));
	bool	   *isnull = palloc(sizeof(bool) * (desc->natts > 0 ? desc->natts : 1));

	PinTupleDesc(desc);
	slot = MakeSingleTupleTableSlot(desc, &TTSOpsMinimalTuple);
	/* A read pointer of our own, as a NamedTuplestoreScan takes (other triggers of the same
	 * statement may read the same transition table). */
	ptr = tuplestore_alloc_read_pointer(ts, EXEC_FLAG_REWIND);
	tuplestore_select_read_pointer(ts, ptr);
	tuplestore_rescan(ts);
	for (;;)
	{
		bool		should_free;
		HeapTuple	tuple;

		tuplestore_select_read_pointer(ts, ptr);
		if (!tuplestore_gettupleslot(ts, true, false, slot))
			break;
		tuple = ExecFetchSlotHeapTuple(slot, false, &should_free);
		if (n == cap)
		{
			if (cap > (int) (MaxAllocSize / sizeof(Datum) / 2))
				ereport(ERROR,
						(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
						 errmsg("fluxbase_capture: too many rows in one statement")));
			cap *= 2;
			images = repalloc(images, sizeof(Datum) * cap);
		}
		images[n++] = row_image(tuple, desc, plan, virt, values, isnull);
		if (should_free)
			heap_freetuple(tuple);
		ExecClearTuple(slot);
	}
	ExecDropSingleTupleTableSlot(slot);
	ReleaseTupleDesc(desc);
	pfree(values);
	pfree(isnull);
	*count = n;
	return images;
}

/*
 * pg_column_size of the image as write_events measures it; `bytes` must be the same whichever
 * capture runs (hostile review 16 F1). write_events measures a statement of several rows on
 * unnest()'s output, whose tuples store an image of up to 126 data bytes with a 1-byte header
 * (3 bytes less than the freshly built datum), but one image (a single-row INSERT or DELETE,
 * every UPDATE) as p_records[1], the array element itself with its 4-byte header. `single`: the
 * statement's only row.
 */
static int32
image_size(Datum image, bool isnull, bool single)
{
	Pointer		p;

	if (isnull)
		return 0;
	p = DatumGetPointer(image);
	if (!single && VARATT_CAN_MAKE_SHORT(p))
		return (int32) VARATT_CONVERTED_SHORT_SIZE(p);
	return (int32) VARSIZE_ANY(p);
}

/* Prepare and keep a plan. The caller is SPI-connected. */
static SPIPlanPtr
keep_plan(const char *sql, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

	if (plan == NULL)
		elog(ERROR, "fluxbase_capture: SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "fluxbase_capture: SPI_keepplan failed");
	return plan;
}

/* write_events(relid, operation, records, olds) as the invoker, as the PL/pgSQL triggers call
 * it (the caller is SPI-connected). */
static void
delegate(Oid relid, const char *operation, Datum *records, Datum *olds, int n, bool olds_null)
{
	Datum		values[4];
	char		nulls[4] = {' ', ' ', ' ', ' '};
	int			rc;

	if (delegate_plan == NULL)
	{
		Oid			argtypes[4] = {REGCLASSOID, TEXTOID, JSONBARRAYOID, JSONBARRAYOID};

		delegate_plan = keep_plan(DELEGATE_SQL, 4, argtypes);
	}
	values[0] = ObjectIdGetDatum(relid);
	values[1] = CStringGetTextDatum(operation);
	values[2] = PointerGetDatum(construct_array(records, n, JSONBOID, -1, false, TYPALIGN_INT));
	if (olds_null)
	{
		values[3] = (Datum) 0;
		nulls[3] = 'n';
	}
	else
		values[3] = PointerGetDatum(construct_array(olds, n, JSONBOID, -1, false, TYPALIGN_INT));
	rc = SPI_execute_plan(delegate_plan, values, nulls, false, 0);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "fluxbase_capture: write_events call failed: %s", SPI_result_code_string(rc));
}

/*
 * The direct outbox write: what the saved INSERT does, without an executor per row (the
 * executor's start and end were most of a captured write). Used only while fluxbase.events is
 * exactly the table this code knows: a plain heap table with the columns below (and no other),
 * `id` an identity column, `xid` defaulting to pg_current_xact_id() and `created_at` to now(), no
 * trigger, rule, CHECK, generated column or row security, and indexes on plain columns (no expression,
 * predicate, exclusion or deferred uniqueness). Anything else (a later migration changed it)
 * takes the saved INSERT plan. No function a tenant can define runs here: the values are built
 * above, the index support functions are the platform indexes' built-in ones.
 */
#define EV_NCOLS 10
enum
{
	EV_ID, EV_XID, EV_PROJECT, EV_KIND, EV_TABLE, EV_OPERATION, EV_RECORD, EV_OLD, EV_CREATED, EV_BYTES
};
static const char *const EV_NAMES[EV_NCOLS] = {
	"id", "xid", "project_id", "kind", "table_name", "operation", "record", "old", "created_at", "bytes"
};
static const Oid EV_TYPES[EV_NCOLS] = {
	INT8OID, XID8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, JSONBOID, JSONBOID, TIMESTAMPTZOID, INT4OID
};

/*
 * What the direct write and the doorbell read know about the platform's tables, kept between
 * calls (the catalog lookups, index list and IndexInfo builds were about a tenth of a captured
 * write). Only oids and values copied into capture_cxt are kept, never a pointer into a relcache
 * or catcache entry (those are rebuilt under us). Every call still opens and locks the tables
 * and indexes, by the kept oids, which processes the pending invalidations; the callbacks below
 * reset what may have changed (they only clear flags), the callers check the flags again once
 * every lock is held and start over otherwise, and what is kept is compared with the opened
 * relations (columns' types, index keys) before it is used. Anything unexpected takes the saved
 * SPI plans, which resolve every name themselves.
 */
static MemoryContext capture_cxt = NULL;

/* The text 'row' (the outbox's `kind`), in TopMemoryContext. */
static Datum row_text;

/* Found by name: schema fluxbase, its tables events and event_readers, the role
 * fluxbase_outbox_writer. Reset by any change to pg_namespace, to pg_class's names, to
 * pg_authid, and by a relcache invalidation of either table. */
static bool oids_valid = false;
static Oid	events_relid = InvalidOid;
static Oid	readers_relid = InvalidOid;
static Oid	hint_relid = InvalidOid;	/* fluxbase.readers_waiting_hint, a sequence (sql/0052) */
static Oid	writer_oid = InvalidOid;

/* fluxbase.events: the verdict on its layout and, when the direct write applies, its indexes
 * (oids, and IndexInfo built into capture_cxt), until a relcache invalidation of the table, of
 * its identity sequence or of one of its indexes. */
static bool events_valid = false;
static bool events_learning = false;	/* still set: the last learning ended in an error */
static bool events_direct = false;
static int	events_natts = 0;
static AttrNumber events_attnum[EV_NCOLS];
static Oid	events_idseq = InvalidOid;
static int	events_nidx = 0;
static Oid *events_idx = NULL;
static IndexInfo **events_iinfo = NULL;

/* The outbox grows by OUTBOX_EXTEND_BY empty pages at a time (outbox_extend), entered into the
 * free space map, instead of PostgreSQL's one page per single-row insert (each a write of 8 KiB
 * of zeros and a size lookup: ~10% of a captured UPDATE's CPU). events_extended_to: the end of
 * the outbox as this backend last knew it (InvalidBlockNumber: not known), reset by a relcache
 * invalidation of the table (a TRUNCATE or VACUUM FULL gives it a new file). */
#define OUTBOX_EXTEND_BY 32
static BlockNumber events_extended_to = InvalidBlockNumber;

/* fluxbase.event_readers' boolean `waiting` (InvalidAttrNumber: the saved query), until a
 * relcache invalidation of the table. */
static bool readers_valid = false;
static AttrNumber readers_waiting = InvalidAttrNumber;


static void
relcache_inval(Datum arg, Oid relid)
{
	int			i;

	if (!OidIsValid(relid) || relid == events_relid || relid == events_idseq)
		events_valid = false;
	if (!OidIsValid(relid) || relid == events_relid)
		events_extended_to = InvalidBlockNumber;
	for (i = 0; i < events_nidx; i++)
		if (events_idx[i] == relid)
			events_valid = false;
	if (!OidIsValid(relid) || relid == readers_relid)
		readers_valid = false;
	if (!OidIsValid(relid) || relid == events_relid || relid == readers_relid || relid == hint_relid)
		oids_valid = false;
}

static void
roles_inval(Datum arg, int cacheid, uint32 hashvalue)
{
	cached_session_user = InvalidOid;
	oids_valid = false;
}

static void
names_inval(Datum arg, int cacheid, uint32 hashvalue)
{
	oids_valid = false;
	if (cacheid == NAMESPACEOID)
		cached_nsp = InvalidOid;
}

void
_PG_init(void)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	row_text = CStringGetTextDatum("row");
	MemoryContextSwitchTo(old);
	capture_cxt = AllocSetContextCreate(TopMemoryContext, "fluxbase_capture", ALLOCSET_SMALL_SIZES);
	CacheRegisterRelcacheCallback(relcache_inval, (Datum) 0);
	CacheRegisterSyscacheCallback(AUTHOID, roles_inval, (Datum) 0);
	CacheRegisterSyscacheCallback(NAMESPACEOID, names_inval, (Datum) 0);
	CacheRegisterSyscacheCallback(RELNAMENSP, names_inval, (Datum) 0);
	CacheRegisterRelcacheCallback(images_relcache_inval, (Datum) 0);
	CacheRegisterSyscacheCallback(TYPEOID, images_syscache_inval, (Datum) 0);
	CacheRegisterSyscacheCallback(CASTSOURCETARGET, images_syscache_inval, (Datum) 0);
}

/* Look the oids up by name. A lookup may process invalidations (a catalog read takes a lock):
 * oids_valid is set first, so one that arrives meanwhile leaves it false. */
static void
lookup_oids(void)
{
	Oid			nsp;
	Oid			events;
	Oid			readers;
	Oid			hint;

	oids_valid = true;
	nsp = get_namespace_oid("fluxbase", true);
	events = OidIsValid(nsp) ? get_relname_relid("events", nsp) : InvalidOid;
	readers = OidIsValid(nsp) ? get_relname_relid("event_readers", nsp) : InvalidOid;
	if (events != events_relid)
		events_valid = false;
	if (readers != readers_relid)
		readers_valid = false;
	events_relid = events;
	readers_relid = readers;
	hint = OidIsValid(nsp) ? get_relname_relid("readers_waiting_hint", nsp) : InvalidOid;
	hint_relid = OidIsValid(hint) && get_rel_relkind(hint) == RELKIND_SEQUENCE ? hint : InvalidOid;
	writer_oid = get_role_oid(OUTBOX_WRITER, true);
}

static bool
default_is_call(TupleConstr *constr, AttrNumber attnum, Oid funcid)
{
	int			i;

	if (constr == NULL)
		return false;
	for (i = 0; i < constr->num_defval; i++)
	{
		if (constr->defval[i].adnum == attnum)
		{
			Node	   *expr = stringToNode(constr->defval[i].adbin);

			return expr != NULL && IsA(expr, FuncExpr) && ((FuncExpr *) expr)->funcid == funcid &&
				((FuncExpr *) expr)->args == NIL;
		}
	}
	return false;
}

/* The checks that need the opened fluxbase.events only (no catalog read), made at every
 * opening: the kind of relation, no trigger, rule or row security, and the kept columns'
 * positions and types against its tuple descriptor. */
static bool
events_shape_ok(Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);
	int			c;

	if (rel->rd_rel->relkind != RELKIND_RELATION || rel->rd_tableam != GetHeapamTableAmRoutine() ||
		rel->rd_rel->relrowsecurity || rel->trigdesc != NULL || rel->rd_rules != NULL ||
		desc->constr == NULL || desc->constr->num_check != 0 ||
		desc->constr->has_generated_stored || desc->constr->has_generated_virtual ||
		desc->natts != events_natts)
		return false;
	for (c = 0; c < EV_NCOLS; c++)
	{
		Form_pg_attribute att;

		if (events_attnum[c] < 1 || events_attnum[c] > desc->natts)
			return false;
		att = TupleDescAttr(desc, events_attnum[c] - 1);
		if (att->attisdropped || att->atttypid != EV_TYPES[c] || att->attgenerated != '\0' ||
			(c == EV_OLD && att->attnotnull))
			return false;
	}
	return true;
}

/* Check fluxbase.events (open) against what the direct write knows, and keep where its columns
 * are. */
static bool
events_layout_ok(Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);
	int			seen = 0;
	int			i;
	int			c;

	for (c = 0; c < EV_NCOLS; c++)
		events_attnum[c] = InvalidAttrNumber;
	events_natts = desc->natts;
	for (i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		bool		known = false;

		if (att->attisdropped)
			continue;
		for (c = 0; c < EV_NCOLS; c++)
		{
			if (strcmp(NameStr(att->attname), EV_NAMES[c]) == 0)
			{
				/* (only `old` may be NULL here: heap_form_tuple checks no NOT NULL) */
				if (events_attnum[c] != InvalidAttrNumber)
					return false;
				events_attnum[c] = att->attnum;
				known = true;
				seen++;
			}
		}
		if (!known)
			return false;
	}
	if (seen != EV_NCOLS || !events_shape_ok(rel))
		return false;
	/* id: an identity column (its sequence), xid and created_at: the defaults the SQL has */
	if (TupleDescAttr(desc, events_attnum[EV_ID] - 1)->attidentity == '\0')
		return false;
	events_idseq = getIdentitySequence(rel, events_attnum[EV_ID], true);
	if (!OidIsValid(events_idseq))
		return false;
	if (!default_is_call(desc->constr, events_attnum[EV_XID], F_PG_CURRENT_XACT_ID) ||
		!default_is_call(desc->constr, events_attnum[EV_CREATED], F_NOW))
		return false;
	return true;
}

/* An index this code can fill: btree (other access methods may need index_insert_cleanup: BRIN
 * keeps a pin), on plain columns of the table (no expression, predicate, exclusion or deferred
 * uniqueness), with the key columns `ii` was built with. Read from the opened index's pg_index
 * row at every opening. */
static bool
index_plain_btree(Relation irel, Oid heap, IndexInfo *ii)
{
	Form_pg_index idx = irel->rd_index;
	int			j;

	if (irel->rd_rel->relam != BTREE_AM_OID || idx->indrelid != heap ||
		!heap_attisnull(irel->rd_indextuple, Anum_pg_index_indexprs, NULL) ||
		!heap_attisnull(irel->rd_indextuple, Anum_pg_index_indpred, NULL) ||
		idx->indisexclusion || (idx->indisunique && !idx->indimmediate) ||
		idx->indnatts != ii->ii_NumIndexAttrs || ii->ii_Expressions != NIL ||
		ii->ii_Predicate != NIL || ii->ii_ExclusionOps != NULL)
		return false;
	for (j = 0; j < idx->indnatts; j++)
		if (idx->indkey.values[j] != ii->ii_IndexAttrNumbers[j] ||
			idx->indkey.values[j] < 1 || idx->indkey.values[j] > events_natts)
			return false;
	return true;
}

/*
 * Learn fluxbase.events (open, locked): its layout and its indexes, into capture_cxt.
 * events_valid is set first: an invalidation while learning (index_open takes locks) clears it
 * and the caller starts over.
 */
static void
events_learn(Relation rel)
{
	List	   *indexes;
	ListCell   *lc;
	MemoryContext old;
	int			n;

	events_valid = true;
	events_learning = true;
	events_direct = false;
	events_nidx = 0;
	events_idx = NULL;
	events_iinfo = NULL;
	MemoryContextReset(capture_cxt);
	if (!events_layout_ok(rel))
	{
		events_learning = false;
		return;
	}
	indexes = RelationGetIndexList(rel);
	n = list_length(indexes);
	old = MemoryContextSwitchTo(capture_cxt);
	events_idx = palloc(sizeof(Oid) * (n > 0 ? n : 1));
	events_iinfo = palloc(sizeof(IndexInfo *) * (n > 0 ? n : 1));
	MemoryContextSwitchTo(old);
	foreach(lc, indexes)
	{
		Oid			ioid = lfirst_oid(lc);
		Relation	irel;
		IndexInfo  *ii;
		bool		ok;

		/* counted before it is opened: an invalidation of it while opening resets */
		events_idx[events_nidx++] = ioid;
		irel = index_open(ioid, RowExclusiveLock);
		old = MemoryContextSwitchTo(capture_cxt);
		ii = BuildIndexInfo(irel);
		MemoryContextSwitchTo(old);
		ok = index_plain_btree(irel, RelationGetRelid(rel), ii);
		index_close(irel, NoLock);
		if (!ok)
		{
			list_free(indexes);
			events_learning = false;
			return;				/* events_direct stays false until the table changes */
		}
		events_iinfo[events_nidx - 1] = ii;
	}
	list_free(indexes);
	events_direct = true;
	events_learning = false;
}

/* fluxbase.events opened once per statement for the direct write of its rows. What the rows
 * are written with is this statement's copy (column positions, sequence, IndexInfo), taken with
 * every lock held: nothing learned later in the statement changes it. */
typedef struct Outbox
{
	bool		opened;
	bool		direct;			/* the direct write applies (else the saved INSERT) */
	Relation	rel;
	int			natts;
	AttrNumber	attnum[EV_NCOLS];
	Oid			idseq;
	int			nidx;
	Relation   *irels;
	IndexInfo  *iinfos;
	Datum	   *values;
	bool	   *nulls;
} Outbox;

/* Open fluxbase.events and its indexes for the direct write, if it applies. */
static void
outbox_open(Outbox *ob)
{
	int			attempt;

	ob->opened = true;
	ob->direct = false;
	for (attempt = 0; attempt < 4; attempt++)
	{
		Oid			relid;
		Relation	rel;
		int			k;
		bool		ok = true;

		if (!oids_valid)
			lookup_oids();
		relid = events_relid;
		if (!OidIsValid(relid))
			return;
		rel = try_table_open(relid, RowExclusiveLock);
		if (rel == NULL)
		{
			oids_valid = false;
			continue;
		}
		if (!oids_valid || events_relid != relid)
		{
			table_close(rel, NoLock);
			continue;
		}
		if (!events_valid || events_learning)
			events_learn(rel);
		if (!events_direct || !events_valid || !events_shape_ok(rel))
		{
			table_close(rel, NoLock);
			if (events_valid && events_direct)
				events_valid = false;	/* the shape changed: learn again */
			else if (events_valid)
				return;			/* the saved INSERT, until the table changes */
			continue;
		}
		/* The outbox writer's right to insert, checked as the saved INSERT checks it, so that an
		 * operator's REVOKE holds for every capture path (review 17): without it, the saved
		 * INSERT, which raises the error. The user id is the writer's here. */
		if (pg_class_aclcheck(relid, GetUserId(), ACL_INSERT) != ACLCHECK_OK)
		{
			table_close(rel, NoLock);
			return;
		}
		ob->nidx = events_nidx;
		ob->irels = palloc(sizeof(Relation) * (ob->nidx > 0 ? ob->nidx : 1));
		ob->iinfos = palloc(sizeof(IndexInfo) * (ob->nidx > 0 ? ob->nidx : 1));
		for (k = 0; k < ob->nidx && ok; k++)
		{
			/* (the kept array: an invalidation while opening only clears events_valid) */
			Relation	irel = try_index_open(events_idx[k], RowExclusiveLock);

			ob->irels[k] = irel;
			if (irel == NULL)
				ok = false;
			else
			{
				memcpy(&ob->iinfos[k], events_iinfo[k], sizeof(IndexInfo));
				ok = index_plain_btree(irel, relid, &ob->iinfos[k]);
			}
		}
		/* Every lock is held: is what was kept still current? */
		if (!ok || !events_valid || !oids_valid || events_relid != relid)
		{
			int			j;

			for (j = 0; j < k; j++)
				if (ob->irels[j] != NULL)
					index_close(ob->irels[j], NoLock);
			table_close(rel, NoLock);
			events_valid = false;
			continue;
		}
		ob->rel = rel;
		ob->natts = events_natts;
		memcpy(ob->attnum, events_attnum, sizeof(events_attnum));
		ob->idseq = events_idseq;
		ob->values = palloc0(sizeof(Datum) * ob->natts);
		ob->nulls = palloc(sizeof(bool) * ob->natts);
		ob->direct = true;
		return;
	}
	/* still changing under us after several tries: the saved INSERT for this statement */
}

static void
outbox_close(Outbox *ob)
{
	int			k;

	if (!ob->opened || !ob->direct)
		return;
	for (k = 0; k < ob->nidx; k++)
		index_close(ob->irels[k], NoLock);
	table_close(ob->rel, NoLock);
	ob->direct = false;
}

/*
 * After an outbox row went to block `blk`: when that is the outbox's last page (the insert
 * extended it, or will on the next row), add OUTBOX_EXTEND_BY empty pages at once and enter them
 * into the free space map, where the next inserts (of any backend) find them, as PostgreSQL's
 * own bulk extension does (hio.c RelationAddBlocks): the new pages are zeroed and unlogged until
 * a tuple goes in, PageInit'd by the insert that takes one, and VACUUM keeps them free. The
 * size is read (a system call) only when a row lands at or past the end this backend knew.
 */
static void
outbox_extend(Relation rel, BlockNumber blk)
{
	Buffer		buffers[OUTBOX_EXTEND_BY];
	uint32		extended_by = 0;
	BlockNumber nblocks;
	BlockNumber first;
	uint32		i;
	Buffer		last;
	Size		free;

	if (BlockNumberIsValid(events_extended_to) && blk + 1 < events_extended_to)
		return;
	nblocks = RelationGetNumberOfBlocks(rel);
	events_extended_to = nblocks;
	if (blk + 1 < nblocks)
		return;					/* pages after it exist (another backend added them) */

	/*
	 * Only once the last page is three quarters full. The free space map hands each session
	 * that has no page of its own yet the next page with room, so sessions of one write each
	 * put one row on each pre-added page, and the one that reached the last page added 32 more
	 * (review 19: 1 000 one-write sessions grew the outbox by 224 pages for ~17 pages of rows).
	 */
	last = ReadBuffer(rel, blk);
	LockBuffer(last, BUFFER_LOCK_SHARE);
	free = PageGetHeapFreeSpace(BufferGetPage(last));
	UnlockReleaseBuffer(last);
	if (free >= BLCKSZ / 4)
		return;
	first = ExtendBufferedRelBy(BMR_REL(rel), MAIN_FORKNUM, NULL, 0, OUTBOX_EXTEND_BY, buffers,
								&extended_by);
	for (i = 0; i < extended_by; i++)
	{
		ReleaseBuffer(buffers[i]);
		RecordPageWithFreeSpace(rel, first + i, BLCKSZ - SizeOfPageHeaderData);
	}
	FreeSpaceMapVacuumRange(rel, first, first + extended_by);
	events_extended_to = first + extended_by;
}

/* Insert one outbox row into the opened fluxbase.events directly. */
static void
direct_insert(Outbox *ob, Datum project, Datum table, Datum operation,
			  Datum record, Datum old, bool old_null, int32 bytes)
{
	const AttrNumber *at = ob->attnum;
	Datum	   *values = ob->values;
	bool	   *nulls = ob->nulls;
	HeapTuple	tuple;
	int			k;

	memset(nulls, true, sizeof(bool) * ob->natts);
	values[at[EV_ID] - 1] = Int64GetDatum(nextval_internal(ob->idseq, false));
	values[at[EV_XID] - 1] = FullTransactionIdGetDatum(GetTopFullTransactionId());
	values[at[EV_PROJECT] - 1] = project;
	values[at[EV_KIND] - 1] = row_text;
	values[at[EV_TABLE] - 1] = table;
	values[at[EV_OPERATION] - 1] = operation;
	values[at[EV_RECORD] - 1] = record;
	values[at[EV_OLD] - 1] = old_null ? (Datum) 0 : old;
	values[at[EV_CREATED] - 1] = TimestampTzGetDatum(GetCurrentTransactionStartTimestamp());
	values[at[EV_BYTES] - 1] = Int32GetDatum(bytes);
	for (k = 0; k < EV_NCOLS; k++)
		nulls[at[k] - 1] = false;
	if (old_null)
		nulls[at[EV_OLD] - 1] = true;
	tuple = heap_form_tuple(RelationGetDescr(ob->rel), values, nulls);
	simple_heap_insert(ob->rel, tuple);

	for (k = 0; k < ob->nidx; k++)
	{
		IndexInfo  *ii = &ob->iinfos[k];
		Datum		ivalues[INDEX_MAX_KEYS];
		bool		inulls[INDEX_MAX_KEYS];
		int			j;

		/* indisready read from the opened index (a CREATE INDEX CONCURRENTLY under way) */
		if (!ob->irels[k]->rd_index->indisready)
			continue;
		/* FormIndexDatum for plain columns (index_plain_btree): the values just stored */
		for (j = 0; j < ii->ii_NumIndexAttrs; j++)
		{
			ivalues[j] = values[ii->ii_IndexAttrNumbers[j] - 1];
			inulls[j] = nulls[ii->ii_IndexAttrNumbers[j] - 1];
		}
		index_insert(ob->irels[k], ivalues, inulls, &tuple->t_self, ob->rel,
					 ob->irels[k]->rd_index->indisunique ? UNIQUE_CHECK_YES : UNIQUE_CHECK_NO,
					 false, ii);
	}
	outbox_extend(ob->rel, ItemPointerGetBlockNumber(&tuple->t_self));
	heap_freetuple(tuple);
}

/* The doorbell's hint (sql/0052): 0 when fluxbase.readers_waiting_hint says no reader waits, -1
 * when it does not (one may wait, or the hint is not known: the caller asks event_readers). Read
 * as the outbox writer, with the rights the scan needs (SELECT of event_readers.waiting: review
 * 17) and SELECT of the sequence; the kept oids and column were checked by this call's opening
 * of the outbox, which processed the pending invalidations, and a column gone since counts as
 * not known. */
static int
readers_hint(void)
{
	Oid			relid = readers_relid;
	Oid			hint = hint_relid;
	AttrNumber	waiting = readers_waiting;
	bool		is_missing = false;
	Datum		value;

	LOCAL_FCINFO(fcinfo, 1);

	if (!oids_valid || !readers_valid || !OidIsValid(relid) || !OidIsValid(hint) || waiting < 1)
		return -1;
	if (pg_attribute_aclcheck_ext(relid, waiting, GetUserId(), ACL_SELECT, &is_missing) != ACLCHECK_OK ||
		is_missing)
		return -1;
	if (pg_class_aclcheck(hint, GetUserId(), ACL_SELECT) != ACLCHECK_OK)
		return -1;
	InitFunctionCallInfoData(*fcinfo, NULL, 1, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = ObjectIdGetDatum(hint);
	fcinfo->args[0].isnull = false;
	value = pg_sequence_last_value(fcinfo);
	if (fcinfo->isnull)
		return -1;
	return DatumGetInt64(value) == 0 ? 0 : -1;
}

/* Is a reader waiting (EXISTS (SELECT 1 FROM fluxbase.event_readers WHERE waiting), on the
 * latest snapshot)? -1 when the table is not what this code knows, or in a serializable
 * transaction (the caller queries). */
static int
direct_readers_waiting(void)
{
	int			attempt;

	/* A serializable transaction reads it as the saved query does (its snapshot, its
	 * predicate locks). */
	if (IsolationIsSerializable())
		return -1;
	/* No reader waits, says the hint: nothing to ask. */
	if (readers_hint() == 0)
		return 0;
	for (attempt = 0; attempt < 4; attempt++)
	{
		Oid			relid;
		Relation	rel;
		TupleDesc	desc;
		AttrNumber	waiting;
		Form_pg_attribute att;
		Snapshot	snap;
		TableScanDesc scan;
		HeapTuple	tup;
		bool		found = false;

		if (!oids_valid)
			lookup_oids();
		relid = readers_relid;
		if (!OidIsValid(relid))
			return -1;
		rel = try_table_open(relid, AccessShareLock);
		if (rel == NULL)
		{
			oids_valid = false;
			continue;
		}
		if (!oids_valid || readers_relid != relid)
		{
			table_close(rel, NoLock);
			continue;
		}
		desc = RelationGetDescr(rel);
		if (!readers_valid)
		{
			int			i;

			readers_valid = true;
			readers_waiting = InvalidAttrNumber;
			for (i = 0; i < desc->natts; i++)
			{
				att = TupleDescAttr(desc, i);
				if (!att->attisdropped && strcmp(NameStr(att->attname), "waiting") == 0)
					readers_waiting = att->attnum;
			}
		}
		waiting = readers_waiting;
		if (waiting < 1 || waiting > desc->natts || rel->rd_rel->relkind != RELKIND_RELATION ||
			rel->rd_tableam != GetHeapamTableAmRoutine() || rel->rd_rel->relrowsecurity)
		{
			table_close(rel, NoLock);
			return -1;
		}
		att = TupleDescAttr(desc, waiting - 1);
		/* (and the writer's right to read it, as the saved plan's SELECT needs: review 17) */
		if (att->attisdropped || att->atttypid != BOOLOID ||
			pg_attribute_aclcheck(relid, waiting, GetUserId(), ACL_SELECT) != ACLCHECK_OK)
		{
			table_close(rel, NoLock);
			return -1;
		}
		snap = RegisterSnapshot(GetLatestSnapshot());
		scan = table_beginscan(rel, snap, 0, NULL);
		while (!found && (tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
		{
			bool		isnull;
			Datum		d = heap_getattr(tup, waiting, desc, &isnull);

			found = !isnull && DatumGetBool(d);
		}
		table_endscan(scan);
		UnregisterSnapshot(snap);
		table_close(rel, NoLock);
		return found ? 1 : 0;
	}
	return -1;
}

/* The saved INSERT: the outbox row when the direct write does not know the table. */
static void
spi_insert(const char *project, const char *table, const char *operation, Datum record,
		   Datum old, bool old_null, int32 bytes)
{
	Datum		values[6];
	char		nulls[6] = {' ', ' ', ' ', ' ', ' ', ' '};
	int			rc;

	if (insert_plan == NULL)
	{
		Oid			argtypes[6] = {TEXTOID, TEXTOID, TEXTOID, JSONBOID, JSONBOID, INT4OID};

		insert_plan = keep_plan(INSERT_SQL, 6, argtypes);
	}
	values[0] = CStringGetTextDatum(project);
	values[1] = CStringGetTextDatum(table);
	values[2] = CStringGetTextDatum(operation);
	values[3] = record;
	values[4] = old_null ? (Datum) 0 : old;
	if (old_null)
		nulls[4] = 'n';
	values[5] = Int32GetDatum(bytes);
	rc = SPI_execute_plan(insert_plan, values, nulls, false, 0);
	if (rc != SPI_OK_INSERT)
		elog(ERROR, "fluxbase_capture: outbox insert failed: %s", SPI_result_code_string(rc));
}

/* The saved doorbell query, when the direct read does not know event_readers. */
static bool
spi_readers_waiting(void)
{
	int			rc;
	bool		isnull = true;
	Datum		v;

	if (bell_plan == NULL)
		bell_plan = keep_plan(BELL_SQL, 0, NULL);
	rc = SPI_execute_plan(bell_plan, NULL, NULL, false, 1);
	if (rc != SPI_OK_SELECT || SPI_tuptable == NULL || SPI_processed != 1)
		elog(ERROR, "fluxbase_capture: doorbell query failed: %s", SPI_result_code_string(rc));
	v = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return !isnull && DatumGetBool(v);
}

static void
spi_connect(bool *connected)
{
	if (*connected)
		return;
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "fluxbase_capture: SPI_connect failed");
	*connected = true;
}

/*
 * The capture of one statement's (or one row's) images: records[i] with olds[i] (olds NULL: no
 * old images). The images are already built, as the invoker. SPI is connected only for what
 * needs it (write_events, and the saved plans when the direct ways do not apply); an error
 * leaves it to the (sub)transaction's abort, as everywhere in PostgreSQL.
 */
static void
capture(Relation rel, const char *operation, Datum *records, Datum *olds, int n)
{
	char		project[17];
	const char *table = RelationGetRelationName(rel);
	Oid			writer;
	Oid			save_userid;
	int			save_sec;
	bool		connected = false;
	Outbox		ob = {0};
	volatile bool wrote = false;
	volatile bool ring = false;
	int			i;
	Datum		project_text;
	Datum		table_text;
	Datum		operation_text;
	bool		deleting = strcmp(operation, "DELETE") == 0;

	if (n <= 0)
		return;
	if (!fast_path(rel, project))
	{
		/* A platform session, or a refusal: write_events decides, as before. */
		spi_connect(&connected);
		delegate(RelationGetRelid(rel), operation, records, olds, n, olds == NULL);
		SPI_finish();
		return;
	}
	if (!oids_valid)
		lookup_oids();
	writer = writer_oid;
	if (!OidIsValid(writer))
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("fluxbase_capture: the role %s does not exist", OUTBOX_WRITER)));

	/*
	 * Only the outbox writes and the doorbell read run as the outbox writer, restricted, and
	 * nothing in them is the tenant's (values built before, platform table, indexes and
	 * sequence). write_events (rows over 1 MiB) is called as the invoker.
	 */
	project_text = CStringGetTextDatum(project);
	table_text = CStringGetTextDatum(table);
	operation_text = CStringGetTextDatum(operation);
	GetUserIdAndSecContext(&save_userid, &save_sec);
	PG_TRY();
	{
		for (i = 0; i < n; i++)
		{
			bool		old_null = olds == NULL;
			Datum		old = old_null ? (Datum) 0 : olds[i];
			int32		bytes = image_size(records[i], false, n == 1) + image_size(old, old_null, n == 1);

			/* what the outbox stores of the old image: none for a DELETE (its record, sql/0053) */
			bool		store_old = !old_null && !deleting;

			if (bytes > CAPTURE_MAX_IMAGE_BYTES)
			{
				/* write_events keeps the small fields of images over 1 MiB (sql/0022). */
				spi_connect(&connected);
				delegate(RelationGetRelid(rel), operation, &records[i], old_null ? NULL : &olds[i], 1,
						 old_null);
				continue;
			}
			SetUserIdAndSecContext(writer, save_sec | SECURITY_LOCAL_USERID_CHANGE |
								   SECURITY_RESTRICTED_OPERATION);
			if (!ob.opened)
				outbox_open(&ob);
			if (ob.direct)
				direct_insert(&ob, project_text, table_text, operation_text, records[i],
							  store_old ? old : (Datum) 0, !store_old, bytes);
			else
			{
				spi_connect(&connected);
				spi_insert(project, table, operation, records[i], store_old ? old : (Datum) 0,
						   !store_old, bytes);
			}
			wrote = true;
			SetUserIdAndSecContext(save_userid, save_sec);
		}
		outbox_close(&ob);

		if (wrote)
		{
			/* The doorbell, rung only while a reader sleeps (every notifying commit takes a
			 * cluster lock). */
			int			direct;

			SetUserIdAndSecContext(writer, save_sec | SECURITY_LOCAL_USERID_CHANGE |
								   SECURITY_RESTRICTED_OPERATION);
			direct = direct_readers_waiting();
			if (direct >= 0)
				ring = direct == 1;
			else
			{
				spi_connect(&connected);
				ring = spi_readers_waiting();
			}
			SetUserIdAndSecContext(save_userid, save_sec);
		}
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_userid, save_sec);
	}
	PG_END_TRY();
	if (ring)
		Async_Notify("fluxbase_events", "");
	if (connected)
		SPI_finish();
}

static TriggerData *
trigger_data(FunctionCallInfo fcinfo, const char *fname)
{
	if (!CALLED_AS_TRIGGER(fcinfo) || fcinfo->context == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("fluxbase_capture.%s may only be called by the capture triggers", fname)));
	return (TriggerData *) fcinfo->context;
}

static void
wrong_attachment(const char *fname, const char *how)
{
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("fluxbase_capture.%s must be attached %s", fname, how)));
}

/* AFTER INSERT ... REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT */
Datum
fluxbase_capture_insert(PG_FUNCTION_ARGS)
{
	TriggerData *td = trigger_data(fcinfo, "capture_insert");
	Datum	   *images;
	Virtuals   *virt;
	int			n = 0;

	if (!TRIGGER_FIRED_AFTER(td->tg_event) || !TRIGGER_FIRED_FOR_STATEMENT(td->tg_event) ||
		!TRIGGER_FIRED_BY_INSERT(td->tg_event) || td->tg_newtable == NULL || td->tg_relation == NULL)
		wrong_attachment("capture_insert", "AFTER INSERT FOR EACH STATEMENT with a NEW TABLE");
	virt = virtuals_begin(td->tg_relation);
	images = transition_images(td->tg_newtable, RelationGetDescr(td->tg_relation),
							   image_plan(td->tg_relation), virt, &n);
	virtuals_end(virt);
	capture(td->tg_relation, "INSERT", images, NULL, n);
	return PointerGetDatum(NULL);
}

/* AFTER DELETE ... REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT */
Datum
fluxbase_capture_delete(PG_FUNCTION_ARGS)
{
	TriggerData *td = trigger_data(fcinfo, "capture_delete");
	Datum	   *images;
	Virtuals   *virt;
	int			n = 0;

	if (!TRIGGER_FIRED_AFTER(td->tg_event) || !TRIGGER_FIRED_FOR_STATEMENT(td->tg_event) ||
		!TRIGGER_FIRED_BY_DELETE(td->tg_event) || td->tg_oldtable == NULL || td->tg_relation == NULL)
		wrong_attachment("capture_delete", "AFTER DELETE FOR EACH STATEMENT with an OLD TABLE");
	virt = virtuals_begin(td->tg_relation);
	images = transition_images(td->tg_oldtable, RelationGetDescr(td->tg_relation),
							   image_plan(td->tg_relation), virt, &n);
	virtuals_end(virt);
	/* record and old are both the deleted row's image, as write_events(.., imgs, imgs) */
	capture(td->tg_relation, "DELETE", images, images, n);
	return PointerGetDatum(NULL);
}

/* AFTER UPDATE ... FOR EACH ROW */
Datum
fluxbase_capture_update(PG_FUNCTION_ARGS)
{
	TriggerData *td = trigger_data(fcinfo, "capture_update");
	TupleDesc	desc;
	ImagePlan  *plan;
	Virtuals   *virt;
	Datum	   *values;
	bool	   *isnull;
	Datum		record;
	Datum		old;

	if (!TRIGGER_FIRED_AFTER(td->tg_event) || !TRIGGER_FIRED_FOR_ROW(td->tg_event) ||
		!TRIGGER_FIRED_BY_UPDATE(td->tg_event) || td->tg_trigtuple == NULL ||
		td->tg_newtuple == NULL || td->tg_relation == NULL)
		wrong_attachment("capture_update", "AFTER UPDATE FOR EACH ROW");
	desc = RelationGetDescr(td->tg_relation);
	plan = image_plan(td->tg_relation);
	values = palloc(sizeof(Datum) * (desc->natts > 0 ? desc->natts : 1));
	isnull = palloc(sizeof(bool) * (desc->natts > 0 ? desc->natts : 1));
	PinTupleDesc(desc);
	virt = virtuals_begin(td->tg_relation);
	record = row_image(td->tg_newtuple, desc, plan, virt, values, isnull);
	old = row_image(td->tg_trigtuple, desc, plan, virt, values, isnull);
	virtuals_end(virt);
	ReleaseTupleDesc(desc);
	capture(td->tg_relation, "UPDATE", &record, &old, 1);
	return PointerGetDatum(NULL);
}

/*
 * fluxbase_guard.reset_session(): the request pipeline's session reset in one call (issue 24).
 *
 * Each request on a pooled tenant session first clears what the previous one left there. As
 * statements that is `CLOSE ALL; UNLISTEN *; RESET ALL; DISCARD TEMP; DISCARD SEQUENCES;
 * SELECT pg_advisory_unlock_all()`, six parse/bind/execute cycles of the backend per request.
 * This does all six as the statements do (PerformPortalClose, ExecSetVariableStmt's RESET ALL,
 * DiscardCommand's TEMP and SEQUENCES, pg_advisory_unlock_all's lock release) in one. A session's
 * first request still starts with a `CLOSE ALL` statement of its own (tenancy/wire.py says why).
 *
 * RESET ALL is refused to tenant SQL (it would drop the request's SET LOCAL identity and caps),
 * and every tenant role may execute this function, so the function refuses wherever a request's
 * own SQL can run: once the platform has set the request identity (fluxbase.auth_uid,
 * auth_claims, auth_role) or a resource cap (tenancy/statements.py ASSERTED) in the current
 * transaction, which leaves a GUC stack entry on that setting. The identity is SET LOCAL ahead of
 * the tenant SQL on every request path (tenancy/identity.py), and the platform's own work on a
 * project's session (admin_session) asserts the caps first, so tenant SQL always finds an entry;
 * between requests, where the pool calls this, there is none. (Not the settings' values: an admin
 * may give its role defaults for them, and its project's every request would then be refused.
 * Not every setting's stack either: PostgreSQL 16 and later only hand out a freshly sorted copy
 * of the whole list, which cost more than the five statements this replaces.) It refuses in a
 * security-restricted operation too, where UNLISTEN, DISCARD and RESET refuse.
 */
PG_FUNCTION_INFO_V1(fluxbase_reset_session);

static void
refuse_reset(const char *function)
{
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("fluxbase_guard.%s may only begin a request", function)));
}

/* tests/test_session_reset.py checks this list against tenancy/statements.py ASSERTED */
static const char *const request_settings[] = {
	"fluxbase.auth_uid", "fluxbase.auth_claims", "fluxbase.auth_role",
	"work_mem", "maintenance_work_mem", "hash_mem_multiplier",
	"max_parallel_workers_per_gather", "max_parallel_maintenance_workers",
	"statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout"
};

static void
reset_session(const char *function)
{
	/* as utility.c's CheckRestrictedOperation for UNLISTEN and DISCARD */
	if (InSecurityRestrictedOperation())
		refuse_reset(function);
	for (int i = 0; i < lengthof(request_settings); i++)
	{
		struct config_generic *setting = find_option(request_settings[i], false, true, ERROR);

		if (setting != NULL && setting->stack != NULL)
			refuse_reset(function);
	}

	/*
	 * The reset is the platform's work, not the request's: a session-level statement_timeout a
	 * request left (dynamic SQL can set one) must not cancel it. With 1 ms and a few thousand
	 * temporary tables to drop, every later request on the session failed here (hostile review
	 * 29). RESET ALL below sets it back, and the next message arms the timer with that value.
	 */
	if (get_timeout_active(STATEMENT_TIMEOUT))
		disable_timeout(STATEMENT_TIMEOUT, false);

	PerformPortalClose(NULL);	/* CLOSE ALL (this call's own portal, active, stays) */
	Async_UnlistenAll();		/* UNLISTEN * */
	ResetAllOptions();			/* RESET ALL */
	ResetTempTableNamespace();	/* DISCARD TEMP */
	ResetSequenceCaches();		/* DISCARD SEQUENCES */
	LockReleaseSession(USER_LOCKMETHOD);	/* pg_advisory_unlock_all() */
}

Datum
fluxbase_reset_session(PG_FUNCTION_ARGS)
{
	reset_session("reset_session()");
	PG_RETURN_VOID();
}

/*
 * fluxbase_guard.begin_request(uid text, claims text, role text): the session reset above, then
 * the request identity, as `SET LOCAL fluxbase.auth_uid = ...; SET LOCAL fluxbase.auth_claims =
 * ...; SET LOCAL fluxbase.auth_role = ...` would set it (tenancy/identity.py): one call where the
 * request pipeline ran four statements (issue 24).
 *
 * It is the reset's guard that keeps tenant SQL from choosing its identity with it: the reset
 * refuses once any request setting has a GUC stack entry in the transaction, and this call
 * leaves one on each of the three it sets, so after it nothing in the same transaction can call
 * it (or the reset) again; every path that runs tenant SQL sets the identity (or asserts the
 * caps) before it (see fluxbase_reset_session). A null argument is refused: a strict function
 * would be skipped, and with it the reset and the identity.
 */
PG_FUNCTION_INFO_V1(fluxbase_begin_request);

static const char *const identity_settings[] = {
	"fluxbase.auth_uid", "fluxbase.auth_claims", "fluxbase.auth_role"
};

Datum
fluxbase_begin_request(PG_FUNCTION_ARGS)
{
	for (int i = 0; i < lengthof(identity_settings); i++)
		if (PG_ARGISNULL(i))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("fluxbase_guard.begin_request() takes no null identity")));
	reset_session("begin_request()");
	for (int i = 0; i < lengthof(identity_settings); i++)
		(void) set_config_option(identity_settings[i], text_to_cstring(PG_GETARG_TEXT_PP(i)),
								 superuser() ? PGC_SUSET : PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_LOCAL, true, 0, false);
	PG_RETURN_VOID();
}
