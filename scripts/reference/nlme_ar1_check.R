# nlme_ar1_check.R -- better nlme references for the AR(1) pig models (tests/reference/nlme_ar1.json).
#
# Why: scripts/reference/lme4_reference.R found that nlme::lme with corAR1 does not converge
# well on  weight ~ week, random = ~ 1 + week | id, correlation = corAR1(form = ~ week | id)
# (REML and ML): the supremum of the likelihood has corr((Intercept), week) -> 1, a boundary
# that nlme's pdMat parametrisations (log-Cholesky, matrix-log) can only approach, never reach.
# This script checks jaxmixed's estimates for that model from several independent directions:
#
#   (0) constant_check: an independent implementation of the marginal Gaussian log likelihood,
#       written here in plain R (V_i = Z_i D Z_i' + sigma^2 S_i C_i(phi) S_i, C_i the AR(1)
#       correlation phi^|t - s|, S_i the varIdent ratios (identity unless given), beta = the
#       GLS estimate given V). ML = -1/2 [n log 2pi + sum log|V_i| + r'V^-1 r];
#       REML = ML + p/2 log 2pi - 1/2 log|X'V^-1 X|  (i.e. the (n - p)/2 log 2pi constant).
#       It is checked against logLik() of nlme fits (AR(1), varIdent, random-intercept and
#       diagonal models, REML and ML) at nlme's own estimates: the differences are recorded and
#       are at rounding level, so this is nlme's REML/ML constant convention.
#   (a) at_jaxmixed: the log likelihood AT jaxmixed's estimates (hard-coded below, full
#       precision, from jm.fit("weight ~ week + (1 + week | id)", pig, "reml"/"ml",
#       residuals=jm.ar(1, time="week"))), both
#         - directly (corr exactly 1; sigma as given and sigma profiled), and
#         - through nlme itself: lme() started at jaxmixed's values with no iterations
#           (lmeControl(maxIter=0, msMaxIter=0, niterEM=0, returnObject=TRUE, opt="optim")),
#           random = list(id = pdSymm(value = D / sigma^2, form = ~ 1 + week)) with the
#           correlation set to 0.9999, 0.999999, 1 - 1e-8 (exactly 1 is not representable),
#           correlation = corAR1(value = phi, form = ~ week | id, fixed = FALSE).
#           nlme profiles sigma out, so its sigma is the optimum given D / sigma^2 and phi.
#   (b) nlme_refits: lme() started FROM jaxmixed's estimates (pdSymm and pdLogChol, starting
#       correlation 0.99 and 0.9999) with opt = "nlminb" and "optim", control
#         lmeControl(maxIter=1000, msMaxIter=1000, msMaxEval=5000, tolerance=1e-12,
#                    returnObject=TRUE)                                ("tight")
#       and the same plus msTol=1e-14, reltol=1e-15                  ("tight+msTol")
#       plus the same controls from nlme's default start. Every fit's logLik, fixef, fixef
#       se, random sds, corr, sigma, phi (and warnings/errors) is stored; nlme_best is the
#       one with the largest logLik.
#   (c) direct_optimum: the profiled likelihood of (0) maximised in R with optim, in a
#       Cholesky parametrisation D / sigma^2 = L L', L = [a 0; b c], which contains the
#       boundary corr = +-1 (c = 0) as an ordinary point; plus the optimum restricted to
#       c = 0 (corr = 1 exactly) and the second derivative of the profiled logLik in c at
#       c = 0 (negative => corr = 1 is a local maximum, i.e. the MLE/REMLE is on the
#       boundary). This is an nlme-independent check of the boundary optimum.
#   (d) Random-intercept model  weight ~ week, random = ~ 1 | id, corAR1(form = ~ week | id):
#       nlme with default lmeControl() and with the tight control (REML and ML). NOTE: this
#       model is NOT interior either: sd((Intercept)) -> 0 (nlme stops at ~1e-3 and reports
#       a non-positive-definite apVar). Its exact boundary limit, the model without a random
#       effect, is fitted by gls(weight ~ week, correlation = corAR1(form = ~ week | id)) and
#       stored under gls_boundary; direct_optimum as in (c) with sd = |a| sigma.
#   (e) Two models whose AR(1) fit IS interior, for well-identified references:
#         pig_ar1_diag_*  : random = list(id = pdDiag(~ week))  (jaxmixed (1 + week || id))
#         pig_ar1_slope_* : random = ~ 0 + week | id           (jaxmixed (0 + week | id))
#       nlme with default and tight control, plus intervals() (95%, nlme's approximate
#       intervals from apVar) for the variance parameters.
#
# Findings of the first run (details in the JSON; "summary" collects the logLiks):
#   - constant_check: direct - nlme logLik within 1e-11 for all 8 fits.
#   - At jaxmixed's estimates the direct logLik is -821.165549756889 (REML) / -819.677935546866
#     (ML), jaxmixed reports -821.1655497569141 / -819.6779355468477 (diff ~2.5e-11); nlme's own
#     logLik at the same point with corr 1 - 1e-8 is -821.165549759244 / -819.677935549387.
#   - No nlme refit exceeds that: best -821.165550122148 / -819.677935804408 (nlminb, pdSymm,
#     start corr 0.99; corr reached 0.9999987 / 0.9999990), i.e. 3.7e-7 / 2.6e-7 below jaxmixed.
#   - The direct optimum is at corr = 1 (c = -4e-7 / -3e-7; restricted c = 0 optimum equal to
#     1e-12; d2 logLik / dc2 = -4.09 / -4.35 < 0), with logLik equal to jaxmixed's to 3e-11 and
#     sd(_cons), sd(week), sigma, phi, fixef equal to jaxmixed's to <= 5e-7 relative (1e-8 for the
#     restricted corr = 1 optimum).
#   - Random-intercept model: boundary sd((Intercept)) = 0; gls limit -848.65647923414 (REML),
#     -847.358635939152 (ML); nlme stops 2e-7 below at sd ~ 1e-3.
#   - Interior models (pdDiag, slope-only): default and tight nlminb agree to < 1e-12 in logLik.
#
# Names: fixef "(Intercept)" is jaxmixed's _cons; random_sd "(Intercept)" is sd(_cons),
# "week" is sd(week); random_corr is corr(week,_cons); phi is jaxmixed's rho; sigma is sd(e).
# Numbers are written with 15 significant digits (jsonlite digits = NA).
# Versions used are written under "_versions" (first run: R 4.2.2, nlme 3.1-162,
# jsonlite 1.8.4).
#
# Rerun from the repository root (about 2-3 minutes, mostly the direct optimisations in (c)):
#   Rscript scripts/reference/nlme_ar1_check.R

suppressPackageStartupMessages({
  library(nlme)
  library(jsonlite)
})

out_file <- file.path("tests", "reference", "nlme_ar1.json")
pig <- read.csv(file.path("jaxmixed", "datasets", "pig.csv"))
stopifnot(nrow(pig) == 432, dir.exists(dirname(out_file)))
pig <- pig[order(pig$id, pig$week), ]

# ------------------------------------------------------------------ jaxmixed's estimates
# jm.fit("weight ~ week + (1 + week | id)", pig, method, residuals=jm.ar(1, time="week"))
# on the working tree at git 61f588e + the uncommitted residual-structure work (repr() of the
# floats; jaxmixed reports corr 1 - 2e-15, i.e. 1).
jaxmixed <- list(
  REML = list(logLik = -821.1655497569141,
              fixef = c(`(Intercept)` = 18.944307386849996, week = 6.264393806220532),
              fixef_se = c(`(Intercept)` = 0.3804632772649094, week = 0.09645289397923107),
              sd_int = 0.7727009056588863, sd_week = 0.5566274420765958, corr = 1,
              sigma = 2.3228450832539176, phi = 0.8100456207369257),
  ML = list(logLik = -819.6779355468477,
            fixef = c(`(Intercept)` = 18.947472356962898, week = 6.264094027313552),
            fixef_se = c(`(Intercept)` = 0.37699478905545086, week = 0.09544041443757822),
            sd_int = 0.7732702063648469, sd_week = 0.5497044356208107, corr = 1,
            sigma = 2.2998181165110005, phi = 0.8064213497439536)
)

# ------------------------------------------------------------------ helpers
warnings_log <- list()
with_warn <- function(label, expr) {
  w <- character(0)
  val <- withCallingHandlers(expr, warning = function(cond) {
    w <<- c(w, conditionMessage(cond))
    invokeRestart("muffleWarning")
  })
  if (length(w)) warnings_log[[label]] <<- c(warnings_log[[label]], w)
  val
}
named_list <- function(x) as.list(setNames(as.numeric(x), names(x)))
rn <- c("(Intercept)", "week")

# Per-subject pieces for the direct likelihood.
X_all <- model.matrix(~ 1 + week, pig)
subj <- split(seq_len(nrow(pig)), pig$id)
n_obs <- nrow(pig)
p_fix <- ncol(X_all)
zcols <- list(us = c("(Intercept)", "week"), ri = "(Intercept)", slope = "week",
              diag = c("(Intercept)", "week"))

# Sufficient sums for covariance W_i = Z D Z' + s2 * S C S (any common scale).
gls_sums <- function(D, s2, phi, zc, ratio = NULL) {
  logdet <- 0
  XtVX <- matrix(0, p_fix, p_fix); XtVy <- numeric(p_fix); ytVy <- 0
  for (idx in subj) {
    Xi <- X_all[idx, , drop = FALSE]
    Zi <- X_all[idx, zc, drop = FALSE]
    ti <- pig$week[idx]
    Ci <- phi^abs(outer(ti, ti, "-"))
    if (!is.null(ratio)) { s <- ratio[as.character(ti)]; Ci <- Ci * outer(s, s) }
    Vi <- Zi %*% D %*% t(Zi) + s2 * Ci
    ch <- chol(Vi)
    logdet <- logdet + 2 * sum(log(diag(ch)))
    A <- backsolve(ch, cbind(Xi, pig$weight[idx]), transpose = TRUE)
    Ax <- A[, 1:p_fix, drop = FALSE]; Ay <- A[, p_fix + 1]
    XtVX <- XtVX + crossprod(Ax); XtVy <- XtVy + drop(crossprod(Ax, Ay)); ytVy <- ytVy + sum(Ay^2)
  }
  list(logdet = logdet, XtVX = XtVX, XtVy = XtVy, ytVy = ytVy)
}

# Marginal log likelihood at given D (absolute covariance of the random effects), sigma, phi.
# beta = NULL: GLS estimate given V (what nlme and jaxmixed report at their estimates).
direct_loglik <- function(D, sigma, phi, method, zc, ratio = NULL, beta = NULL) {
  s <- gls_sums(D, sigma^2, phi, zc, ratio)
  bhat <- solve(s$XtVX, s$XtVy)
  b <- if (is.null(beta)) bhat else beta
  quad <- s$ytVy - 2 * sum(b * s$XtVy) + drop(t(b) %*% s$XtVX %*% b)
  ll <- -0.5 * (n_obs * log(2 * pi) + s$logdet + quad)
  if (method == "REML")
    ll <- ll + 0.5 * p_fix * log(2 * pi) - 0.5 * as.numeric(determinant(s$XtVX)$modulus)
  list(logLik = ll, fixef = setNames(bhat, rn),
       fixef_se = setNames(sqrt(diag(solve(s$XtVX))), rn))
}

# Profiled (sigma and beta out) log likelihood at relative D / sigma^2 = Drel and phi.
profiled <- function(Drel, phi, method, zc) {
  s <- gls_sums(Drel, 1, phi, zc)
  bhat <- solve(s$XtVX, s$XtVy)
  quad <- s$ytVy - sum(bhat * s$XtVy)
  reml <- method == "REML"
  m <- n_obs - if (reml) p_fix else 0
  s2 <- quad / m
  ll <- -0.5 * (m * (log(2 * pi * s2) + 1) + s$logdet +
                  if (reml) as.numeric(determinant(s$XtVX)$modulus) else 0)
  list(logLik = ll, sigma = sqrt(s2), fixef = setNames(bhat, rn),
       fixef_se = setNames(sqrt(s2 * diag(solve(s$XtVX))), rn))
}

D_from <- function(sd_int, sd_week, corr) {
  D <- diag(c(sd_int, sd_week)) %*% matrix(c(1, corr, corr, 1), 2) %*% diag(c(sd_int, sd_week))
  dimnames(D) <- list(rn, rn)
  D
}

# Summaries of an lme fit (full precision; VarCorr() is rounded text).
lme_summary <- function(fit, control_label) {
  V <- as.matrix(getVarCov(fit))
  sds <- sqrt(diag(V)); nm <- rownames(V)
  out <- list(
    method = fit$method,
    control = control_label,
    logLik = as.numeric(logLik(fit)),
    fixef = named_list(fixef(fit)),
    fixef_se = named_list(sqrt(diag(vcov(fit)))),
    random_sd = named_list(setNames(sds, nm))
  )
  if (length(sds) == 2) out$random_corr <- V[1, 2] / prod(sds)
  out$sigma <- fit$sigma
  out$phi <- as.numeric(coef(fit$modelStruct$corStruct, unconstrained = FALSE))
  out$apVar_ok <- !is.character(fit$apVar)
  if (!out$apVar_ok) out$apVar_message <- fit$apVar
  out
}

# (formals after `...` so that `control =` is not partially matched to them)
run_lme <- function(..., .label, .ctrl) {
  label <- .label; control_label <- .ctrl
  t0 <- proc.time()[["elapsed"]]
  fit <- tryCatch(with_warn(label, lme(weight ~ week, data = pig, ...)), error = function(e) e)
  el <- proc.time()[["elapsed"]] - t0
  if (inherits(fit, "error"))
    return(list(label = label, control = control_label, error = conditionMessage(fit)))
  r <- c(list(label = label), lme_summary(fit, control_label))
  r$seconds <- el
  if (!is.null(warnings_log[[label]])) r$warnings <- warnings_log[[label]]
  attr(r, "fit") <- fit
  r
}

ctrl_tight_label <- "lmeControl(opt=OPT, maxIter=1000, msMaxIter=1000, msMaxEval=5000, tolerance=1e-12, returnObject=TRUE)"
ctrl_tighter_label <- "lmeControl(opt=OPT, maxIter=1000, msMaxIter=1000, msMaxEval=5000, tolerance=1e-12, msTol=1e-14, reltol=1e-15, returnObject=TRUE)"
ctrl_tight <- function(opt) lmeControl(opt = opt, maxIter = 1000, msMaxIter = 1000,
                                       msMaxEval = 5000, tolerance = 1e-12, returnObject = TRUE)
ctrl_tighter <- function(opt) lmeControl(opt = opt, maxIter = 1000, msMaxIter = 1000,
                                         msMaxEval = 5000, tolerance = 1e-12, msTol = 1e-14,
                                         reltol = 1e-15, returnObject = TRUE)
controls <- list(tight = list(f = ctrl_tight, label = ctrl_tight_label),
                 `tight+msTol` = list(f = ctrl_tighter, label = ctrl_tighter_label))

# nlme with lmeControl() defaults, then with each tight control under nlminb and optim
default_and_tight <- function(lab, random, m) {
  d <- run_lme(random = random,
               correlation = corAR1(form = ~ week | id),
               method = m,
               .label = paste0(lab, "_default"),
               .ctrl = "lmeControl() defaults (nlminb)")
  tf <- list()
  for (opt in c("nlminb", "optim")) for (cn in names(controls)) {
    fl <- paste0(lab, "_", cn, "_", opt)
    tf[[fl]] <- run_lme(random = random,
                        correlation = corAR1(form = ~ week | id),
                        method = m,
                        control = controls[[cn]]$f(opt),
                        .label = fl,
                        .ctrl = sub("OPT", opt, controls[[cn]]$label))
  }
  list(default = d, tight = tf)
}

best_of <- function(fits) {
  ok <- Filter(function(r) is.null(r$error), fits)
  if (!length(ok)) { str(lapply(fits, function(r) r$error)); stop("all fits failed") }
  ll <- vapply(ok, function(r) r$logLik, 0)
  b <- ok[[which.max(ll)]]
  attr(b, "fit") <- NULL
  b
}
strip <- function(lst) lapply(lst, function(r) { attr(r, "fit") <- NULL; r })

# Maximise the profiled likelihood over (Cholesky of Drel, atanh(phi)) from several starts.
# free: which of (a, b, c) (or a alone for q = 1) are optimised; the others are held fixed.
direct_opt <- function(method, zc, starts, fixed_c0 = FALSE) {
  q <- length(zc)
  unpack <- function(th) {
    if (q == 1) return(list(Drel = matrix(th[1]^2, 1, 1, dimnames = list(zc, zc)),
                            phi = tanh(th[2])))
    a <- th[1]; b <- th[2]; c <- if (fixed_c0) 0 else th[3]
    L <- matrix(c(a, b, 0, c), 2)
    Drel <- L %*% t(L); dimnames(Drel) <- list(rn, rn)
    list(Drel = Drel, phi = tanh(th[length(th)]))
  }
  f <- function(th) {
    u <- unpack(th)
    v <- tryCatch(-profiled(u$Drel, u$phi, method, zc)$logLik, error = function(e) Inf)
    if (is.finite(v)) v else 1e10  # non-positive-definite V (|phi| -> 1): reject
  }
  best <- NULL
  for (st in starts) {
    th <- st
    for (k in 1:4) {
      o1 <- optim(th, f, method = "BFGS", control = list(reltol = 1e-16, maxit = 10000, ndeps = rep(1e-7, length(th))))
      o2 <- optim(o1$par, f, method = "Nelder-Mead", control = list(reltol = 1e-16, maxit = 20000))
      th <- if (o2$value < o1$value) o2$par else o1$par
    }
    val <- f(th)
    if (is.null(best) || val < best$value) best <- list(par = th, value = val, start = st)
  }
  u <- unpack(best$par)
  pr <- profiled(u$Drel, u$phi, method, zc)
  D <- u$Drel * pr$sigma^2
  sds <- sqrt(diag(D))
  res <- list(logLik = pr$logLik, fixef = named_list(pr$fixef), fixef_se = named_list(pr$fixef_se),
              random_sd = named_list(setNames(sds, zc)))
  if (q == 2) res$random_corr <- D[1, 2] / prod(sds)
  res$sigma <- pr$sigma
  res$phi <- u$phi
  res$cholesky_par <- as.numeric(best$par[-length(best$par)])
  res$optimizer <- "optim BFGS (reltol 1e-16, ndeps 1e-7) then Nelder-Mead, 4 rounds, best of starts"
  attr(res, "par") <- best$par
  attr(res, "f") <- f
  res
}

# Second derivative of the profiled logLik along one coordinate (central differences).
d2 <- function(f, par, i, h = 1e-4) {
  e <- replace(numeric(length(par)), i, h)
  -(f(par + e) - 2 * f(par) + f(par - e)) / h^2
}

result <- list()
result[["_versions"]] <- list(R = R.version.string,
                              nlme = as.character(packageVersion("nlme")),
                              jsonlite = as.character(packageVersion("jsonlite")))
result[["_about"]] <- paste(
  "Computed by scripts/reference/nlme_ar1_check.R (run from the repo root); see its header.",
  "Data: jaxmixed/datasets/pig.csv (48 pigs x 9 weeks). fixef '(Intercept)' = jaxmixed _cons;",
  "random_sd '(Intercept)' = sd(_cons), 'week' = sd(week); random_corr = corr(week,_cons);",
  "phi = jaxmixed rho; sigma = sd(e). 'direct' = the marginal Gaussian likelihood computed",
  "in plain R with nlme's REML constant convention (verified under constant_check).")
result[["_controls"]] <- list(
  default = "lmeControl() defaults (nlminb, maxIter=50, msMaxIter=50, tolerance=1e-6, msTol=1e-7)",
  tight = ctrl_tight_label,
  `tight+msTol` = ctrl_tighter_label,
  evaluate_only = "lmeControl(maxIter=0, msMaxIter=0, niterEM=0, returnObject=TRUE, opt='optim')")

# ------------------------------------------------------------------ (0) constant check
cc <- list()
chk <- function(label, fit, zc, ratio = NULL) {
  V <- as.matrix(getVarCov(fit))
  phi <- if (is.null(fit$modelStruct$corStruct)) 0 else
    as.numeric(coef(fit$modelStruct$corStruct, unconstrained = FALSE))
  d <- direct_loglik(V, fit$sigma, phi, fit$method, zc, ratio = ratio)
  cc[[label]] <<- list(nlme_logLik = as.numeric(logLik(fit)), direct_logLik = d$logLik,
                       difference = d$logLik - as.numeric(logLik(fit)),
                       fixef_max_abs_diff = max(abs(d$fixef - fixef(fit))),
                       fixef_se_max_abs_diff = max(abs(d$fixef_se - sqrt(diag(vcov(fit))))))
}
for (m in c("REML", "ML")) {
  f <- with_warn("constant_check", lme(weight ~ week, data = pig, random = ~ 1 + week | id,
                 weights = varIdent(form = ~ 1 | week), method = m))
  chk(paste0("varIdent_", m), f, zcols$us,
      ratio = coef(f$modelStruct$varStruct, unconstrained = FALSE, allCoef = TRUE))
  f <- with_warn("constant_check", lme(weight ~ week, data = pig, random = ~ 1 + week | id, method = m))
  chk(paste0("iid_us_", m), f, zcols$us)
  f <- with_warn("constant_check", lme(weight ~ week, data = pig, random = list(id = pdDiag(~ week)),
                 correlation = corAR1(form = ~ week | id), method = m))
  chk(paste0("ar1_diag_", m), f, zcols$diag)
  f <- with_warn("constant_check", lme(weight ~ week, data = pig, random = ~ 1 | id,
                 correlation = corAR1(form = ~ week | id), method = m))
  chk(paste0("ar1_ri_", m), f, zcols$ri)
}
cc[["_note"]] <- paste(
  "difference = direct - nlme logLik at nlme's own estimates (D = getVarCov, sigma, phi or",
  "varIdent ratios). REML = ML-form at GLS beta + p/2 log(2 pi) - 1/2 log|X'V^-1 X|.")
result[["constant_check"]] <- cc

# ------------------------------------------------------------------ (a)-(c) intercept + slope
for (m in c("REML", "ML")) {
  jx <- jaxmixed[[m]]
  lab <- paste0("pig_ar1_us_", tolower(m))
  r <- list(model = "weight ~ week, random = ~ 1 + week | id, correlation = corAR1(form = ~ week | id)",
            method = m)
  r$jaxmixed_estimates <- list(logLik = jx$logLik, fixef = named_list(jx$fixef),
                               fixef_se = named_list(jx$fixef_se),
                               random_sd = list(`(Intercept)` = jx$sd_int, week = jx$sd_week),
                               random_corr = jx$corr, sigma = jx$sigma, phi = jx$phi)

  # (a) at jaxmixed's estimates
  D <- D_from(jx$sd_int, jx$sd_week, 1)
  a_given <- direct_loglik(D, jx$sigma, jx$phi, m, zcols$us)
  a_beta <- direct_loglik(D, jx$sigma, jx$phi, m, zcols$us, beta = jx$fixef)
  a_prof <- profiled(D / jx$sigma^2, jx$phi, m, zcols$us)
  at <- list(
    direct_corr1_sigma_given = list(logLik = a_given$logLik, fixef = named_list(a_given$fixef),
                                    fixef_se = named_list(a_given$fixef_se)),
    direct_corr1_sigma_given_beta_jaxmixed = list(logLik = a_beta$logLik),
    direct_corr1_sigma_profiled = list(logLik = a_prof$logLik, sigma = a_prof$sigma,
                                       fixef = named_list(a_prof$fixef),
                                       fixef_se = named_list(a_prof$fixef_se)))
  ev <- list()
  for (rho in c(0.9999, 0.999999, 1 - 1e-8)) {
    Dr <- D_from(jx$sd_int, jx$sd_week, rho)
    el <- paste0(lab, "_eval_", format(rho, digits = 10))
    fit <- tryCatch(with_warn(el, lme(weight ~ week, data = pig,
             random = list(id = pdSymm(value = Dr / jx$sigma^2, form = ~ 1 + week)),
             correlation = corAR1(value = jx$phi, form = ~ week | id, fixed = FALSE), method = m,
             control = lmeControl(maxIter = 0, msMaxIter = 0, niterEM = 0, returnObject = TRUE,
                                  opt = "optim"))),
             error = function(e) e)
    if (inherits(fit, "error")) { ev[[length(ev) + 1]] <- list(corr_set = rho, error = conditionMessage(fit)); next }
    s <- lme_summary(fit, "evaluate_only")
    s$corr_set <- rho
    s$direct_same_params <- direct_loglik(Dr, jx$sigma, jx$phi, m, zcols$us)$logLik
    s$direct_same_params_sigma_profiled <- profiled(Dr / jx$sigma^2, jx$phi, m, zcols$us)$logLik
    ev[[length(ev) + 1]] <- s
  }
  at$nlme_evaluate_only <- ev
  at$`_note` <- paste(
    "direct_*: corr exactly 1. nlme_evaluate_only: lme() started at jaxmixed's D/sigma^2 (with",
    "corr_set) and phi, no iterations; nlme profiles sigma (its sigma is the optimum given",
    "D/sigma^2, phi), so compare logLik with direct_same_params_sigma_profiled.")
  r$at_jaxmixed <- at

  # (b) nlme refits from jaxmixed's estimates (and from nlme's default start)
  fits <- list()
  for (cn in names(controls)) for (opt in c("nlminb", "optim")) {
    for (pdc in c("pdSymm", "pdLogChol")) for (rho in c(0.99, 0.9999)) {
      Dr <- D_from(jx$sd_int, jx$sd_week, rho) / jx$sigma^2
      pd <- if (pdc == "pdSymm") pdSymm(value = Dr, form = ~ 1 + week) else pdLogChol(value = Dr, form = ~ 1 + week)
      fl <- paste0(lab, "_", cn, "_", opt, "_", pdc, "_start", rho)
      fr <- run_lme(random = list(id = pd),
                    correlation = corAR1(value = jx$phi, form = ~ week | id, fixed = FALSE),
                    method = m,
                    control = controls[[cn]]$f(opt),
                    .label = fl,
                    .ctrl = sub("OPT", opt, controls[[cn]]$label))
      fr$start <- paste0("jaxmixed estimates, ", pdc, ", corr ", rho)
      fits[[fl]] <- fr
    }
    fl <- paste0(lab, "_", cn, "_", opt, "_defaultstart")
    fr <- run_lme(random = ~ 1 + week | id,
                  correlation = corAR1(form = ~ week | id),
                  method = m,
                  control = controls[[cn]]$f(opt),
                  .label = fl,
                  .ctrl = sub("OPT", opt, controls[[cn]]$label))
    fr$start <- "nlme default start (pdLogChol)"
    fits[[fl]] <- fr
  }
  r$nlme_refits <- unname(strip(fits))
  r$nlme_best <- best_of(fits)

  # (c) direct optimum (nlme-independent), Cholesky parametrisation containing corr = 1
  a0 <- jx$sd_int / jx$sigma; b0 <- jx$sd_week / jx$sigma
  starts <- list(c(a0, b0, 0.01, atanh(jx$phi)), c(a0, b0, -0.05, atanh(jx$phi)),
                 c(0.3, 0.2, 0.1, atanh(0.8)), c(1, 0.3, 0.3, atanh(0.5)))
  un <- direct_opt(m, zcols$us, starts)
  fu <- attr(un, "f"); pu <- attr(un, "par")
  r1 <- direct_opt(m, zcols$us, lapply(starts, function(s) s[-3]), fixed_c0 = TRUE)
  p1 <- attr(r1, "par")
  full_at_r1 <- c(p1[1:2], 0, p1[3])
  r$direct_optimum <- list(
    unrestricted = { attr(un, "f") <- NULL; attr(un, "par") <- NULL; un },
    corr1_restricted = { attr(r1, "f") <- NULL; attr(r1, "par") <- NULL; r1 },
    d2_logLik_dc2_at_corr1 = d2(fu, full_at_r1, 3),
    `_note` = paste(
      "D/sigma^2 = L L', L = [a 0; b c] (order (Intercept), week), phi = tanh(last par);",
      "corr1_restricted fixes c = 0 (corr = +1 exactly). d2_logLik_dc2_at_corr1 < 0 means",
      "corr = 1 is a local maximum of the profiled likelihood in the full parameter space."))
  result[[lab]] <- r
}

# ------------------------------------------------------------------ (d) random intercept only
for (m in c("REML", "ML")) {
  lab <- paste0("pig_ar1_ri_", tolower(m))
  r <- list(model = "weight ~ week, random = ~ 1 | id, correlation = corAR1(form = ~ week | id)",
            method = m)
  dt <- default_and_tight(lab, ~ 1 | id, m)
  d <- dt$default; tf <- dt$tight
  r$nlme_default <- strip(list(d))[[1]]
  r$nlme_tight <- unname(strip(tf))
  r$nlme_best <- best_of(c(list(d), tf))
  g <- with_warn(paste0(lab, "_gls"), gls(weight ~ week, data = pig, method = m,
                 correlation = corAR1(form = ~ week | id)))
  r$gls_boundary <- list(
    model = "gls(weight ~ week, correlation = corAR1(form = ~ week | id)) = the sd((Intercept)) = 0 limit",
    `_note` = paste("For ML, gls() scales vcov by N/(N-p), so its fixef_se is sqrt(432/430) times",
                    "the lme/direct convention; logLik, fixef, sigma, phi are directly comparable."),
    logLik = as.numeric(logLik(g)), fixef = named_list(coef(g)),
    fixef_se = named_list(sqrt(diag(vcov(g)))), random_sd = list(`(Intercept)` = 0),
    sigma = g$sigma, phi = as.numeric(coef(g$modelStruct$corStruct, unconstrained = FALSE)))
  starts <- list(c(0.2, atanh(0.9)), c(0.5, atanh(0.5)), c(0.01, atanh(0.95)))
  op <- direct_opt(m, zcols$ri, starts)
  fo <- attr(op, "f")
  gp <- c(0, atanh(r$gls_boundary$phi))
  r$direct_optimum <- list(
    optimum = { attr(op, "f") <- NULL; attr(op, "par") <- NULL; op },
    d2_logLik_da2_at_sd0 = d2(fo, gp, 1),
    `_note` = paste("sd((Intercept)) = |a| sigma; d2_logLik_da2_at_sd0 at the gls boundary",
                    "fit: < 0 means sd = 0 is a local maximum."))
  r$`_note` <- paste(
    "Not interior: the (RE)ML estimate is on the boundary sd((Intercept)) = 0; nlme stops at",
    "sd ~ 1e-3 (apVar not positive definite) with logLik equal to the gls_boundary fit to",
    "~2e-7. Use logLik/fixef/sigma/phi; sd((Intercept)) is 0 in the limit.")
  result[[lab]] <- r
}

# ------------------------------------------------------------------ (e) interior AR(1) models
interior <- list(
  diag = list(random = list(id = pdDiag(~ week)),
              model = "weight ~ week, random = list(id = pdDiag(~ week)), correlation = corAR1(form = ~ week | id)",
              jaxmixed = "weight ~ week + (1 + week || id)"),
  slope = list(random = ~ 0 + week | id,
               model = "weight ~ week, random = ~ 0 + week | id, correlation = corAR1(form = ~ week | id)",
               jaxmixed = "weight ~ week + (0 + week | id)"))
iv <- function(fit) {
  it <- tryCatch(intervals(fit, which = "var-cov"), error = function(e) e)
  if (inherits(it, "error")) return(list(error = conditionMessage(it)))
  re <- it$reStruct$id
  list(random_sd = lapply(setNames(seq_len(nrow(re)), sub("^sd\\((.*)\\)$", "\\1", rownames(re))),
                          function(i) as.list(re[i, ])),
       phi = as.list(it$corStruct[1, ]), sigma = as.list(it$sigma[c("lower", "est.", "upper")]))
}
for (k in names(interior)) for (m in c("REML", "ML")) {
  lab <- paste0("pig_ar1_", k, "_", tolower(m))
  spec <- interior[[k]]
  r <- list(model = spec$model, jaxmixed_formula = spec$jaxmixed, method = m)
  dt <- default_and_tight(lab, spec$random, m)
  d <- dt$default; tf <- dt$tight
  ints <- iv(attr(d, "fit"))
  r$nlme_default <- strip(list(d))[[1]]
  r$nlme_default$intervals_95 <- ints
  r$nlme_tight <- unname(strip(tf))
  r$nlme_best <- best_of(c(list(d), tf))
  r$`_note` <- paste("Interior optimum (apVar positive definite). intervals_95: nlme intervals()",
                     "(Wald on the unconstrained scale from apVar), from the default fit.")
  result[[lab]] <- r
}

summ <- list()
for (m in c("reml", "ml")) {
  r <- result[[paste0("pig_ar1_us_", m)]]
  summ[[paste0("us_", m)]] <- list(
    jaxmixed_logLik = r$jaxmixed_estimates$logLik,
    direct_logLik_at_jaxmixed = r$at_jaxmixed$direct_corr1_sigma_given$logLik,
    nlme_logLik_at_jaxmixed_corr_1m1e8 = r$at_jaxmixed$nlme_evaluate_only[[3]]$logLik,
    direct_optimum_logLik = r$direct_optimum$unrestricted$logLik,
    direct_optimum_corr = r$direct_optimum$unrestricted$random_corr,
    nlme_best_logLik = r$nlme_best$logLik,
    nlme_best_corr = r$nlme_best$random_corr,
    nlme_best_label = r$nlme_best$label)
  for (k in c("ri", "diag", "slope")) {
    r <- result[[paste0("pig_ar1_", k, "_", m)]]
    summ[[paste0(k, "_", m)]] <- list(nlme_best_logLik = r$nlme_best$logLik,
                                      nlme_best_label = r$nlme_best$label)
    if (!is.null(r$gls_boundary)) summ[[paste0(k, "_", m)]]$gls_boundary_logLik <- r$gls_boundary$logLik
  }
}
result[["summary"]] <- summ

result[["_warnings"]] <- if (length(warnings_log)) warnings_log else list()

writeLines(toJSON(result, auto_unbox = TRUE, digits = NA, pretty = TRUE, null = "null"), out_file)
cat("wrote", out_file, "\n")

# Short console summary.
for (m in c("reml", "ml")) {
  r <- result[[paste0("pig_ar1_us_", m)]]
  cat(sprintf("%-4s us: jaxmixed %.10f | direct at jaxmixed %.10f | nlme best %.10f (corr %.6f) | direct optimum %.10f (corr %.10f)\n",
              m, r$jaxmixed_estimates$logLik, r$at_jaxmixed$direct_corr1_sigma_given$logLik,
              r$nlme_best$logLik, r$nlme_best$random_corr,
              r$direct_optimum$unrestricted$logLik, r$direct_optimum$unrestricted$random_corr))
}
for (m in c("reml", "ml")) for (k in c("ri", "diag", "slope")) {
  r <- result[[paste0("pig_ar1_", k, "_", m)]]
  cat(sprintf("%-4s %-5s: nlme best %.10f (phi %.8f, sigma %.8f)\n", m, k, r$nlme_best$logLik,
              r$nlme_best$phi, r$nlme_best$sigma))
}
