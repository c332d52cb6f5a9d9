# lme4_reference.R -- reference values for jaxmixed, computed once with R's lme4 and nlme.
#
# What it computes (all written to tests/reference/lme4_reference.json):
#   lme4 (lmer):
#     jsp_slope_indep_reml : math5 ~ math3c + (1 + math3c || school), REML.
#                            logLik, fixef, sigma, VarCorr sds, and per school (all 48) the
#                            intercept/slope BLUPs with conditional SEs sqrt(diag(condVar)).
#                            (`||` gives two terms, `school` (Intercept) and `school.1` (math3c);
#                            lme4 1.1-31's ranef() returns them as one data frame whose "postVar"
#                            attribute is a list of two arrays; both layouts are handled.)
#     jsp_ri_reml          : math5 ~ math3c + (1 | school), REML: BLUPs + condVar SEs, logLik.
#     jsp_slope_us_ml      : math5 ~ math3c + (1 + math3c | school), ML: logLik, fixef, isSingular.
#     pig_crossed_reml     : weight ~ week + (1 | id) + (1 | week), REML: logLik, BLUPs + SEs per
#                            id and per week, fitted() for the first 20 rows.
#     prod_nested_reml     : gsp ~ private + emp + hwy + water + other + unemp
#                            + (1 | region) + (1 | region:state), REML: logLik, fixef, BLUPs + SEs
#                            for region and region:state (keys as lme4 names the levels).
#     jsp_lrtest_ml        : ML fits of (1 | school) and (1 + math3c || school); logLiks and
#                            anova() chi-square and df.
#     dyestuff2            : lme4's Dyestuff2 (also written to tests/reference/dyestuff2.csv),
#                            Yield ~ 1 + (1 | Batch), REML: logLik, fixef, sigma, Batch sd, isSingular.
#   nlme (lme), under "nlme":
#     pig_ar1_reml / pig_ar1_ml       : weight ~ week, random = ~ 1 + week | id,
#                                       correlation = corAR1(form = ~ week | id).
#     pig_hetero_reml / pig_hetero_ml : weight ~ week, random = ~ 1 + week | id,
#                                       weights = varIdent(form = ~ 1 | week).
#     Each: logLik, fixef, fixef se, random sds + corr, sigma, and phi / varIdent ratios
#     (ratios relative to the first stratum, week 1, which is 1).
#     CAVEAT pig_ar1_*: default nlminb fails; the requested fallback
#     lmeControl(opt="optim", maxIter=200, msMaxIter=200) is used, but the likelihood is flat
#     with its supremum on the boundary corr -> 1, so that fit is not the exact maximum; a
#     tighter refit is stored under diagnostic_tighter_fit for comparison.
#
# JSP: math3c = math3 - mean(math3) over all 887 rows.
# Versions used are printed into the JSON under "_versions" (R 4.2.2, lme4 1.1-31,
# nlme 3.1-162, Matrix 1.5-3 when first run).
#
# Rerun from the repository root:
#   Rscript scripts/reference/lme4_reference.R

suppressPackageStartupMessages({
  library(lme4)
  library(nlme)
  library(jsonlite)
})

out_dir <- file.path("tests", "reference")
data_dir <- file.path("jaxmixed", "datasets")
stopifnot(dir.exists(out_dir), dir.exists(data_dir))

warnings_log <- list()
# Evaluate an expression, recording (and muffling) any warnings under `label`.
with_warn <- function(label, expr) {
  w <- character(0)
  val <- withCallingHandlers(expr, warning = function(cond) {
    w <<- c(w, conditionMessage(cond))
    invokeRestart("muffleWarning")
  })
  if (length(w)) warnings_log[[label]] <<- w
  val
}

named_list <- function(x) as.list(setNames(as.numeric(x), names(x)))

lmer_msgs <- function(fit) {
  m <- fit@optinfo$conv$lme4$messages
  if (is.null(m)) character(0) else as.character(m)
}

# Per-level BLUP and conditional SE for every term of a grouping factor entry of ranef().
# attr(, "postVar") is either one array [k, k, nlev] or, when the factor has several
# independent terms (e.g. from `||`; lme4 >= 1.1-? merges them into one data frame),
# a list of such arrays, one per term.
blup_table <- function(re_df) {
  pv <- attr(re_df, "postVar")
  terms <- colnames(re_df)
  se <- matrix(NA_real_, nrow(re_df), length(terms), dimnames = list(NULL, terms))
  if (is.list(pv)) {
    col <- 0
    for (a in pv) {
      for (j in seq_len(dim(a)[1])) se[, col + j] <- sqrt(a[j, j, ])
      col <- col + dim(a)[1]
    }
  } else {
    for (j in seq_along(terms)) se[, j] <- sqrt(pv[j, j, ])
  }
  stopifnot(!anyNA(se))
  res <- list()
  for (i in seq_len(nrow(re_df))) {
    lev <- rownames(re_df)[i]
    entry <- list()
    for (j in seq_along(terms)) {
      entry[[terms[j]]] <- list(blup = re_df[i, j], se = se[i, j])
    }
    res[[lev]] <- entry
  }
  res
}

# Merge the per-level tables of all ranef() entries for grouping factor `g`
# (covers both `school` alone and the older `school` + `school.1` split).
merged_table <- function(re, g) {
  keys <- names(re)[names(re) == g | grepl(paste0("^", g, "\\.[0-9]+$"), names(re))]
  stopifnot(length(keys) >= 1)
  res <- list()
  for (k in keys) {
    tab <- blup_table(re[[k]])
    for (lev in names(tab)) res[[lev]] <- c(res[[lev]], tab[[lev]])
  }
  res
}

vc_sds <- function(fit) {
  vc <- as.data.frame(VarCorr(fit))
  lab <- ifelse(is.na(vc$var2),
                paste(vc$grp, ifelse(is.na(vc$var1), "", vc$var1), sep = "|"),
                paste(vc$grp, vc$var1, vc$var2, sep = "|"))
  lab <- sub("\\|$", "", lab)
  setNames(as.list(vc$sdcor), lab)
}

lmer_common <- function(fit) {
  list(
    REML = isREML(fit),
    logLik = as.numeric(logLik(fit)),
    fixef = named_list(fixef(fit)),
    sigma = sigma(fit),
    VarCorr_sdcor = vc_sds(fit),
    isSingular = isSingular(fit),
    nobs = nobs(fit),
    theta = as.numeric(getME(fit, "theta")),
    convergence_messages = lmer_msgs(fit)
  )
}

result <- list()
result[["_versions"]] <- list(
  R = R.version.string,
  lme4 = as.character(packageVersion("lme4")),
  nlme = as.character(packageVersion("nlme")),
  Matrix = as.character(packageVersion("Matrix")),
  jsonlite = as.character(packageVersion("jsonlite"))
)
result[["_about"]] <- paste(
  "Computed by scripts/reference/lme4_reference.R (run from the repo root).",
  "JSP uses math3c = math3 - mean(math3) over all 887 rows.",
  "Random-effect entries: per level, per term, {blup, se} with se = sqrt(diag(condVar))",
  "from ranef(fit, condVar=TRUE) attr 'postVar'. VarCorr_sdcor labels are grp|var1",
  "(sd) or grp|var1|var2 (correlation); 'Residual' is sigma.")

# ---------------------------------------------------------------- data
jsp <- read.csv(file.path(data_dir, "jsp.csv"))
stopifnot(nrow(jsp) == 887)
jsp$math3c <- jsp$math3 - mean(jsp$math3)
jsp$school <- factor(jsp$school)
stopifnot(nlevels(jsp$school) == 48)

pig <- read.csv(file.path(data_dir, "pig.csv"))
pig$idf <- factor(pig$id)
pig$weekf <- factor(pig$week)

prod <- read.csv(file.path(data_dir, "productivity.csv"))
prod$region <- factor(prod$region)
prod$state <- factor(prod$state)

# ---------------------------------------------------------------- 1. jsp slope, independent, REML
fit1 <- with_warn("jsp_slope_indep_reml",
  lmer(math5 ~ math3c + (1 + math3c || school), data = jsp, REML = TRUE))
re1 <- ranef(fit1, condVar = TRUE)
t1 <- merged_table(re1, "school")
schools1 <- list()
for (s in levels(jsp$school)) {
  schools1[[s]] <- list(
    intercept = t1[[s]][["(Intercept)"]]$blup,
    slope = t1[[s]][["math3c"]]$blup,
    se_intercept = t1[[s]][["(Intercept)"]]$se,
    se_slope = t1[[s]][["math3c"]]$se
  )
}
stopifnot(length(schools1) == 48, !anyNA(unlist(schools1)))
r1 <- lmer_common(fit1)
r1$ranef_school <- schools1
r1$`_note` <- paste("`||` gives two independent terms (VarCorr groups 'school' = (Intercept), 'school.1' = math3c);",
                     "ranef() may return them as one data frame with a list-valued postVar or as two entries;",
                     "merged per school here.")
result[["jsp_slope_indep_reml"]] <- r1

# ---------------------------------------------------------------- 2. jsp random intercept, REML
fit2 <- with_warn("jsp_ri_reml",
  lmer(math5 ~ math3c + (1 | school), data = jsp, REML = TRUE))
re2 <- ranef(fit2, condVar = TRUE)
t2 <- blup_table(re2[["school"]])
schools2 <- lapply(t2, function(e) list(blup = e[["(Intercept)"]]$blup, se = e[["(Intercept)"]]$se))
r2 <- lmer_common(fit2)
r2$ranef_school <- schools2
result[["jsp_ri_reml"]] <- r2

# ---------------------------------------------------------------- 3. jsp slope, unstructured, ML
fit3 <- with_warn("jsp_slope_us_ml",
  lmer(math5 ~ math3c + (1 + math3c | school), data = jsp, REML = FALSE))
result[["jsp_slope_us_ml"]] <- lmer_common(fit3)

# ---------------------------------------------------------------- 4. pig crossed, REML
fit4 <- with_warn("pig_crossed_reml",
  lmer(weight ~ week + (1 | id) + (1 | week), data = pig, REML = TRUE))
re4 <- ranef(fit4, condVar = TRUE)
one_term <- function(tab) lapply(tab, function(e) list(blup = e[[1]]$blup, se = e[[1]]$se))
r4 <- lmer_common(fit4)
r4$ranef_id <- one_term(blup_table(re4[["id"]]))
r4$ranef_week <- one_term(blup_table(re4[["week"]]))
r4$fitted_first20 <- unname(as.numeric(fitted(fit4)[1:20]))
result[["pig_crossed_reml"]] <- r4

# ---------------------------------------------------------------- 5. productivity nested, REML
fit5 <- with_warn("prod_nested_reml",
  lmer(gsp ~ private + emp + hwy + water + other + unemp + (1 | region) + (1 | region:state),
       data = prod, REML = TRUE))
re5 <- ranef(fit5, condVar = TRUE)
r5 <- lmer_common(fit5)
r5$ranef_region <- one_term(blup_table(re5[["region"]]))
r5$ranef_region_state <- one_term(blup_table(re5[["region:state"]]))
result[["prod_nested_reml"]] <- r5

# ---------------------------------------------------------------- 6. jsp LR test, ML
fit6a <- with_warn("jsp_lrtest_ml_ri",
  lmer(math5 ~ math3c + (1 | school), data = jsp, REML = FALSE))
fit6b <- with_warn("jsp_lrtest_ml_indep",
  lmer(math5 ~ math3c + (1 + math3c || school), data = jsp, REML = FALSE))
av <- anova(fit6a, fit6b)
result[["jsp_lrtest_ml"]] <- list(
  logLik_ri = as.numeric(logLik(fit6a)),
  logLik_slope_indep = as.numeric(logLik(fit6b)),
  fixef_ri = named_list(fixef(fit6a)),
  fixef_slope_indep = named_list(fixef(fit6b)),
  VarCorr_sdcor_ri = vc_sds(fit6a),
  VarCorr_sdcor_slope_indep = vc_sds(fit6b),
  chisq = av$Chisq[2],
  df = av$Df[2],
  p_value = av[["Pr(>Chisq)"]][2],
  isSingular_slope_indep = isSingular(fit6b)
)

# ---------------------------------------------------------------- 7. Dyestuff2
data(Dyestuff2, package = "lme4")
write.csv(data.frame(Batch = as.character(Dyestuff2$Batch), Yield = Dyestuff2$Yield),
          file.path(out_dir, "dyestuff2.csv"), row.names = FALSE)
fit7 <- with_warn("dyestuff2",
  lmer(Yield ~ 1 + (1 | Batch), data = Dyestuff2, REML = TRUE))
r7 <- lmer_common(fit7)
r7$Batch_sd <- attr(VarCorr(fit7)$Batch, "stddev")[[1]]
result[["dyestuff2"]] <- r7

# ---------------------------------------------------------------- 8./9. nlme on pig
default_ctrl <- lmeControl()
fallback_ctrl <- lmeControl(opt = "optim", maxIter = 200, msMaxIter = 200)

fit_lme <- function(label, method, ...) {
  fit <- tryCatch(with_warn(label, lme(weight ~ week, data = pig, random = ~ 1 + week | id,
                                       method = method, control = default_ctrl, ...)),
                  error = function(e) e)
  ctrl <- "lmeControl() defaults (nlminb)"
  if (inherits(fit, "error")) {
    warnings_log[[paste0(label, "_default_error")]] <<- conditionMessage(fit)
    fit <- with_warn(label, lme(weight ~ week, data = pig, random = ~ 1 + week | id,
                                method = method, control = fallback_ctrl, ...))
    ctrl <- "lmeControl(opt='optim', maxIter=200, msMaxIter=200)"
  }
  list(fit = fit, control = ctrl)
}

lme_common <- function(fit, control) {
  # VarCorr() on an lme fit is a rounded character matrix; use the full-precision covariance.
  V <- getVarCov(fit)  # random-effects covariance, order (Intercept), week
  sds <- sqrt(diag(V))
  nm <- rownames(V)
  corr <- V[1, 2] / (sds[1] * sds[2])
  list(
    method = fit$method,
    control = control,
    logLik = as.numeric(logLik(fit)),
    fixef = named_list(fixef(fit)),
    fixef_se = named_list(sqrt(diag(vcov(fit)))),
    random_sd = list(`(Intercept)` = sds[nm == "(Intercept)"], week = sds[nm == "week"]),
    random_corr = corr,
    sigma = fit$sigma,
    apVar_ok = !is.character(fit$apVar)
  )
}

nl <- list()
for (m in c("REML", "ML")) {
  lab <- paste0("pig_ar1_", tolower(m))
  f <- fit_lme(lab, m, correlation = corAR1(form = ~ week | id))
  r <- lme_common(f$fit, f$control)
  r$phi <- as.numeric(coef(f$fit$modelStruct$corStruct, unconstrained = FALSE))
  # Diagnostic: this model's likelihood is very flat and its supremum lies on the boundary
  # (random intercept/slope correlation -> 1), so the requested optim(200) fit stops short of
  # it. Refit with much tighter tolerances and record how far off the reported fit is.
  tight <- tryCatch(with_warn(paste0(lab, "_tight"),
    lme(weight ~ week, data = pig, random = ~ 1 + week | id, method = m,
        correlation = corAR1(form = ~ week | id),
        control = lmeControl(opt = "optim", maxIter = 1000, msMaxIter = 1000,
                             msTol = 1e-12, tolerance = 1e-10, reltol = 1e-14))),
    error = function(e) e)
  if (!inherits(tight, "error")) {
    rt <- lme_common(tight, "lmeControl(opt='optim', maxIter=1000, msMaxIter=1000, msTol=1e-12, tolerance=1e-10, reltol=1e-14)")
    rt$phi <- as.numeric(coef(tight$modelStruct$corStruct, unconstrained = FALSE))
    r$diagnostic_tighter_fit <- rt
  }
  r$`_note` <- paste(
    "Default lmeControl() (nlminb) fails (iteration limit / singular convergence), so the",
    "requested fallback control was used. The likelihood is very flat with its supremum on",
    "the boundary corr((Intercept), week) -> 1; the fallback fit is NOT the maximum",
    "(diagnostic_tighter_fit reaches a higher logLik with corr near 1). Random-effect sds,",
    "corr, sigma and phi are therefore not well identified: use logLik and fixef only, with",
    "loose tolerance, or treat the model as a boundary case.")
  nl[[lab]] <- r

  lab <- paste0("pig_hetero_", tolower(m))
  f <- fit_lme(lab, m, weights = varIdent(form = ~ 1 | week))
  r <- lme_common(f$fit, f$control)
  ratios <- coef(f$fit$modelStruct$varStruct, unconstrained = FALSE, allCoef = TRUE)
  r$varIdent_ratios <- named_list(ratios)
  r$`_note` <- "varIdent_ratios: residual SD of week w = sigma * ratio[w]; week 1 is the reference (1)."
  nl[[lab]] <- r
}
result[["nlme"]] <- nl

result[["_warnings"]] <- if (length(warnings_log)) warnings_log else list()

writeLines(toJSON(result, auto_unbox = TRUE, digits = NA, pretty = TRUE, null = "null"),
           file.path(out_dir, "lme4_reference.json"))
cat("wrote", file.path(out_dir, "lme4_reference.json"), "\n")
if (length(warnings_log)) { cat("warnings:\n"); str(warnings_log) }
